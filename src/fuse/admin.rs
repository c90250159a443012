//! Namespace changes asked over the control socket (the CLI): the same
//! rules as mkdir/rmdir/mv through the mount, plus what only the CLI can
//! do (clone, rollback, resize, labels, recursive destroy). Changes that
//! remove or replace a device drop its inodes and tell the kernel to forget
//! the directory entry, so nobody sees stale content.

use super::inode;
use super::{Caller, Core};
use crate::engine::{DeviceInfo, Engine, Target};
use crate::error::{Error, Result};
use crate::meta::{DeviceKind, DeviceRecord};
use crate::types::{Bytes, Name};
use std::ffi::OsStr;
use std::sync::Arc;

impl Core {
    /// The engine (inspection goes straight to it).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Set the kernel notifier once the session exists.
    pub fn set_notifier(&self, n: fuser::Notifier) {
        let _ = self.notifier.set(n);
    }

    /// Ask the kernel to forget `name` in directory `parent`.
    fn inval(&self, parent: u64, name: &str) {
        if let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_entry(fuser::INodeNo(parent), OsStr::new(name))
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::debug!("invalidate {name:?} in {parent:#x}: {e}");
        }
    }

    /// Where a device's directory entry lives: (parent inode, name).
    fn entry_of_record(&self, r: &DeviceRecord) -> (u64, String) {
        match (r.kind, r.parent) {
            (DeviceKind::Snapshot, Some(img)) => (inode::snapdir_ino(img), r.name.to_string()),
            _ => (inode::ROOT_INO, r.name.to_string()),
        }
    }

    fn ensure_unused(&self, r: &DeviceRecord, what: &str) -> Result<()> {
        let open = self.open_count_settled(r.id);
        if open > 0 {
            return Err(Error::Busy(format!(
                "cannot {what} {}: {open} file(s) open in it",
                self.engine.full_name(r)
            )));
        }
        Ok(())
    }

    /// Forget a device that is gone or replaced: inodes, mount, dentry.
    fn forget_device(&self, r: &DeviceRecord) {
        self.engine.unmount(r.id);
        self.purge(r.id);
        let (p, n) = self.entry_of_record(r);
        self.inval(p, &n);
    }

    /// Unmount images and snapshots idle for `idle` or more (no open file
    /// or directory in them, no use since) and ask the kernel to drop their
    /// directory entries, so that it forgets their inodes and the
    /// filesystem really goes away. Returns how many were expired.
    pub fn expire_idle(&self, idle: std::time::Duration) -> usize {
        let now = crate::engine::now_secs();
        let mut n = 0;
        for (id, last, _) in self.engine.mounted_ids() {
            if now.saturating_sub(last) < idle.as_secs() || self.open_count(id) > 0 {
                continue;
            }
            let Ok(r) = self.engine.record(id) else {
                continue;
            };
            self.engine.unmount(id);
            let (p, name) = self.entry_of_record(&r);
            self.inval(p, &name);
            n += 1;
        }
        n
    }

    /// `thinfs create`.
    pub fn admin_create(&self, c: &Caller, name: &Name, size: Option<Bytes>) -> Result<DeviceInfo> {
        self.require_admin(c, &format!("create {name}"))?;
        let r = self.engine.create_image(name, size)?;
        self.inval(inode::ROOT_INO, name.as_str());
        self.engine.info(&r, false)
    }

    /// `thinfs snapshot NAME@SNAP`.
    pub fn admin_snapshot(&self, c: &Caller, t: &Target) -> Result<DeviceInfo> {
        let snap = t
            .snap
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("snapshot needs NAME@SNAP, got {t}")))?;
        self.require_admin(c, &format!("snapshot {t}"))?;
        let img = self.engine.resolve(&Target {
            image: t.image.clone(),
            snap: None,
        })?;
        let r = self.engine.snapshot(img.id, snap)?;
        self.engine.info(&r, false)
    }

    /// `thinfs clone NAME@SNAP NEW`.
    pub fn admin_clone(&self, c: &Caller, src: &Target, new: &Name) -> Result<DeviceInfo> {
        self.require_admin(c, &format!("clone {src} to {new}"))?;
        let r = self.engine.clone_snapshot(src, new)?;
        self.inval(inode::ROOT_INO, new.as_str());
        self.engine.info(&r, false)
    }

    /// `thinfs destroy TARGET [-r]`.
    pub fn admin_destroy(&self, c: &Caller, t: &Target, recursive: bool) -> Result<()> {
        self.require_admin(c, &format!("destroy {t}"))?;
        let r = self.engine.resolve(t)?;
        let mut victims = Vec::new();
        if r.kind == DeviceKind::Image {
            let snaps = self.engine.snapshots_of(r.id)?;
            if !snaps.is_empty() && !recursive {
                return Err(Error::NotEmpty(format!(
                    "{t} has {} snapshot(s); use -r to destroy them too",
                    snaps.len()
                )));
            }
            victims.extend(snaps);
        }
        victims.push(r);
        for v in &victims {
            self.ensure_unused(v, "destroy")?;
        }
        for v in victims {
            self.engine.destroy_id(v.id)?;
            self.forget_device(&v);
        }
        Ok(())
    }

    /// `thinfs rollback NAME@SNAP [--destroy-newer]`.
    pub fn admin_rollback(&self, c: &Caller, t: &Target, destroy_newer: bool) -> Result<()> {
        self.require_admin(c, &format!("rollback to {t}"))?;
        let snap = self.engine.resolve(t)?;
        let image = snap
            .parent
            .filter(|_| snap.kind == DeviceKind::Snapshot)
            .ok_or_else(|| Error::Invalid(format!("rollback needs NAME@SNAP, got {t}")))?;
        let img = self.engine.record(image)?;
        self.ensure_unused(&img, "roll back")?;
        let newer: Vec<DeviceRecord> = self
            .engine
            .snapshots_of(image)?
            .into_iter()
            .filter(|s| s.seq > snap.seq)
            .collect();
        if destroy_newer {
            for s in &newer {
                self.ensure_unused(s, "destroy")?;
            }
        }
        // Nothing of the old content may stay reachable.
        self.forget_device(&img);
        self.engine.rollback(t, destroy_newer)?;
        if destroy_newer {
            for s in &newer {
                self.forget_device(s);
            }
        }
        Ok(())
    }

    /// `thinfs rename OLD NEW` (an image, or `NAME@A NAME@B`/`NAME@A B`).
    pub fn admin_rename(&self, c: &Caller, t: &Target, new: &Name) -> Result<()> {
        self.require_admin(c, &format!("rename {t}"))?;
        let r = self.engine.resolve(t)?;
        self.engine.rename(t, new)?;
        let (p, n) = self.entry_of_record(&r);
        self.inval(p, &n);
        self.inval(p, new.as_str());
        Ok(())
    }

    /// `thinfs resize NAME SIZE`: online where the kernel lets us (needs
    /// CAP_SYS_RESOURCE); otherwise, if no file is open in the image, it is
    /// unmounted, grown offline, and mounted again on next use.
    pub fn admin_resize(&self, c: &Caller, t: &Target, size: Bytes) -> Result<()> {
        self.require_admin(c, &format!("resize {t}"))?;
        match self.engine.resize(t, size) {
            Err(e) if e.errno() == libc::EPERM => {
                let r = self.engine.resolve(t)?;
                log::warn!("online resize of {t} refused ({e}); resizing offline");
                self.ensure_unused(&r, "resize (offline)")?;
                self.forget_device(&r);
                self.engine.resize(t, size)
            }
            other => other,
        }
    }

    /// `thinfs fsck TARGET`: unmount it (no file may be open in it), check
    /// and repair its filesystem; it is mounted again on next use.
    pub fn admin_fsck(&self, c: &Caller, t: &Target) -> Result<(i32, String)> {
        self.require_admin(c, &format!("fsck {t}"))?;
        let r = self.engine.resolve(t)?;
        self.ensure_unused(&r, "fsck")?;
        self.forget_device(&r);
        self.engine.fsck(t)
    }

    /// `thinfs label TARGET KEY[=VALUE]`.
    pub fn admin_label(
        &self,
        c: &Caller,
        t: &Target,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        self.require_admin(c, &format!("label {t}"))?;
        if key.is_empty() || key.len() > 255 || key.contains('=') || key.contains('\0') {
            return Err(Error::Invalid(format!(
                "bad label key {key:?} (1-255 bytes, no '=' or NUL)"
            )));
        }
        self.engine.set_label(t, key, value)
    }
}
