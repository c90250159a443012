//! The service: the one place where a request to change images and
//! snapshots, from any front end, is checked and carried out. It takes the
//! caller's identity ([`Caller`], captured once by the front end), checks
//! rights (root or the admin group), validates what only a request can get
//! wrong, and calls the engine. The engine owns the rules, the locks and
//! the crash-safe steps, and tells the mount what to forget through
//! [`crate::engine::Holders`]. Front ends (FUSE mkdir/rmdir/mv of images and
//! snapshots, the control socket, later gRPC and streams) only decode their
//! transport and call these functions; none of them decides rights itself.

mod backup;
mod caller;
pub mod containerd;
mod export;
mod import;
mod job;
mod sparse;
mod stream;
#[cfg(test)]
mod tar_props;
mod tario;
mod tarwalk;
mod untar;
mod usage;

pub use backup::{BackupIndex, BackupRequest, RestoreRequest, Section, read_index, verify_file};
pub use caller::Caller;
pub use export::{ExportRequest, ExportSummary};
pub use import::{
    GZIP_MAGIC, IMPORT_SNAPSHOT, ImportRequest, ImportSummary, ZSTD_MAGIC, size_to_fit,
    tar_directory,
};
pub use job::Job;
pub use stream::{HaveSnapshot, Haves, ReceiveRequest, ReceiveSummary, SendRequest, SendSummary};

use crate::engine::{DeviceInfo, Engine, Target};
use crate::error::{Error, Result};
use crate::types::{Bytes, DeviceId, Name};
use std::sync::Arc;

/// The control plane over one engine.
pub struct Service {
    engine: Arc<Engine>,
    /// Members of this group (name, gid) may change images, as root may.
    admin_group: Option<(String, u32)>,
    /// The last usage scan (see [`usage`]).
    scans: usage::Scans,
}

impl Service {
    /// A service over `engine`; `admin_group` members may change things.
    pub fn new(engine: Arc<Engine>, admin_group: Option<(String, u32)>) -> Service {
        Service {
            engine,
            admin_group,
            scans: usage::Scans::default(),
        }
    }

    /// The engine (inspection goes straight to it).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The admin group, if any.
    pub fn admin_group(&self) -> Option<&(String, u32)> {
        self.admin_group.as_ref()
    }

    /// Only root and members of the admin group may change images and
    /// snapshots.
    pub fn require_admin(&self, c: &Caller, what: &str) -> Result<()> {
        if c.uid == 0 {
            return Ok(());
        }
        if let Some((name, gid)) = &self.admin_group {
            if c.gid == *gid || c.groups().contains(gid) {
                return Ok(());
            }
            return Err(Error::PermissionDenied(format!(
                "{what} needs root or group {name} (uid {} is in neither)",
                c.uid
            )));
        }
        Err(Error::PermissionDenied(format!(
            "{what} needs root (uid {} asked)",
            c.uid
        )))
    }

    /// Only root may write raw content into the pool (receive, restore,
    /// import): such content may hold setuid-root programs and device
    /// nodes, which the mount would let anyone use, so the admin group's
    /// delegation stops here.
    pub fn require_root(&self, c: &Caller, what: &str) -> Result<()> {
        if c.uid == 0 {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{what} needs root (uid {} asked): a stream or archive may hold setuid-root programs and device nodes, which the mount would expose to every user",
            c.uid
        )))
    }

    /// Create image `name` (`thinfs create`, `mkdir MOUNT/NAME`).
    pub fn create(&self, c: &Caller, name: &Name, size: Option<Bytes>) -> Result<DeviceId> {
        self.require_admin(c, &format!("create image {name}"))?;
        Ok(self.engine.create_image(name, size)?.id)
    }

    /// Snapshot `image` as `snap` (`mkdir IMAGE/.snapshots/SNAP`).
    pub fn snapshot_of(&self, c: &Caller, image: DeviceId, snap: &Name) -> Result<DeviceId> {
        self.require_admin(c, &format!("snapshot {snap}"))?;
        Ok(self.engine.snapshot(image, snap)?.id)
    }

    /// `thinfs snapshot NAME@SNAP`.
    pub fn snapshot(&self, c: &Caller, t: &Target) -> Result<DeviceInfo> {
        let snap = t
            .snap
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("snapshot needs NAME@SNAP, got {t}")))?;
        self.require_admin(c, &format!("snapshot {t}"))?;
        let img = self.engine.snapshot_origin(&t.image)?;
        let r = self.engine.snapshot(img.id, snap)?;
        self.engine.info(&r, false)
    }

    /// `thinfs create` with the new image's description.
    pub fn create_info(&self, c: &Caller, name: &Name, size: Option<Bytes>) -> Result<DeviceInfo> {
        let id = self.create(c, name, size)?;
        self.engine.info(&self.engine.record(id)?, false)
    }

    /// `thinfs clone NAME@SNAP NEW`.
    pub fn clone_snapshot(&self, c: &Caller, src: &Target, new: &Name) -> Result<DeviceInfo> {
        self.require_admin(c, &format!("clone {src} to {new}"))?;
        let r = self.engine.clone_snapshot(src, new)?;
        self.engine.info(&r, false)
    }

    /// `thinfs destroy TARGET [-r]`, `rmdir IMAGE/.snapshots/SNAP`.
    pub fn destroy(&self, c: &Caller, t: &Target, recursive: bool) -> Result<()> {
        self.require_admin(c, &format!("destroy {t}"))?;
        self.engine.destroy(t, recursive)
    }

    /// `rmdir MOUNT/NAME`: only an empty image without snapshots.
    pub fn destroy_if_empty(&self, c: &Caller, name: &Name) -> Result<()> {
        self.engine
            .image_id(name)?
            .ok_or_else(|| Error::NotFound(format!("no image {name}")))?;
        self.require_admin(c, &format!("destroy image {name}"))?;
        self.engine.destroy_if_empty(name)
    }

    /// `thinfs rollback NAME@SNAP [--destroy-newer]`.
    pub fn rollback(&self, c: &Caller, t: &Target, destroy_newer: bool) -> Result<()> {
        self.require_admin(c, &format!("rollback to {t}"))?;
        self.engine.rollback(t, destroy_newer)
    }

    /// `thinfs rename OLD NEW`, `mv` in the root or in one `.snapshots`.
    pub fn rename(&self, c: &Caller, t: &Target, new: &Name) -> Result<()> {
        self.require_admin(c, &format!("rename {t}"))?;
        self.engine.rename(t, new)
    }

    /// `thinfs resize NAME SIZE`: online where the kernel lets us (needs
    /// CAP_SYS_RESOURCE); otherwise, if no file is open in the image, it is
    /// grown offline and mounted again on next use.
    pub fn resize(&self, c: &Caller, t: &Target, size: Bytes) -> Result<()> {
        self.require_admin(c, &format!("resize {t}"))?;
        self.engine.resize(t, size)
    }

    /// `thinfs fsck TARGET`: check and repair its filesystem offline (no
    /// file may be open in it); it is mounted again on next use.
    pub fn fsck(&self, c: &Caller, t: &Target) -> Result<(i32, String)> {
        self.require_admin(c, &format!("fsck {t}"))?;
        self.engine.fsck(t)
    }

    /// `thinfs label TARGET KEY[=VALUE]`.
    pub fn label(&self, c: &Caller, t: &Target, key: &str, value: Option<&str>) -> Result<()> {
        self.require_admin(c, &format!("label {t}"))?;
        if key.is_empty() || key.len() > 255 || key.contains('=') || key.contains('\0') {
            return Err(Error::Invalid(format!(
                "bad label key {key:?} (1-255 bytes, no '=' or NUL)"
            )));
        }
        self.engine.set_label(t, key, value)
    }
}
