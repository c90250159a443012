//! Create an image, snapshot an image, clone a snapshot.
//!
//! Order of every creation (what a crash at each step leaves):
//! 1. record with state `Creating` (+ name index), one transaction
//!    -> crash: recovery deletes the backend device if any and the record
//! 2. backend device made (create + mkfs, or snapshot)
//! 3. state `Ready`, one transaction -> the device exists with its record

use super::{Engine, Target, failpoint, now_secs};
use crate::error::{Error, IoContext, Result};
use crate::meta::{DeviceKind, DeviceRecord, DeviceState};
use crate::sys::fsio;
use crate::sys::tools::Tool;
use crate::types::{Bytes, DeviceId, Name};
use std::collections::BTreeMap;

/// Filesystem put in new images.
pub const DEFAULT_FS: &str = "ext4";

/// The label the daemon marks its own temporary devices with (see
/// [`Engine::snapshot_temporary`]); its value says which kind.
pub const TEMPORARY_LABEL: &str = "thinfs.temporary";

/// Is `rec` a temporary of kind `what` that a daemon made itself?
pub fn is_temporary(rec: &DeviceRecord, what: &str) -> bool {
    rec.labels.get(TEMPORARY_LABEL).map(String::as_str) == Some(what)
}

/// The smallest device an image may have.
pub const MIN_DEVICE: u64 = 16 << 20;
/// The largest device thinfs makes or accepts from a stream: the largest
/// ext4 with 4 KiB blocks (2^48 blocks).
pub const MAX_DEVICE: u64 = 1 << 60;

/// Metadata an ext4 of `size` bytes holds at least, as mkfs.ext4 writes
/// it: about 16 MiB per TiB (bitmaps, group descriptors, journal), and
/// 4 MiB at least (measured: 57 MiB for 4T, 1 GiB for 64T).
pub(super) fn ext4_metadata(size: u64) -> u64 {
    (4 << 20) + size / 65536
}

/// A new device record as every creator writes it (create's intent,
/// receive's and import's publish): `Ready`, made now, no parent, labels
/// or error; the caller sets what differs.
pub(super) fn ready_record(
    dev: DeviceId,
    name: Name,
    kind: DeviceKind,
    size: Bytes,
    seq: u64,
    identity: Option<crate::meta::Identity>,
) -> DeviceRecord {
    DeviceRecord {
        id: dev,
        dev,
        name,
        kind,
        parent: None,
        size,
        fs: DEFAULT_FS.into(),
        state: DeviceState::Ready,
        pending_dev: None,
        error: None,
        created: now_secs(),
        seq,
        labels: BTreeMap::new(),
        identity,
        containerd: None,
    }
}

impl Engine {
    /// Write the intent record of a new device; returns it.
    fn intent(
        &self,
        name: &Name,
        kind: DeviceKind,
        parent: Option<DeviceId>,
        size: Bytes,
    ) -> Result<DeviceRecord> {
        let _g = self.alloc.lock();
        let dev = self.alloc_dev()?;
        let seq = self.meta.pool()?.map(|p| p.transaction_id + 1).unwrap_or(0);
        let identity = match kind {
            DeviceKind::Snapshot => Some(
                crate::meta::Identity::random().map_err(|e| Error::io("read /dev/urandom", e))?,
            ),
            DeviceKind::Image | DeviceKind::Containerd => None,
        };
        let rec = DeviceRecord {
            parent,
            state: DeviceState::Creating,
            ..ready_record(dev, name.clone(), kind, size, seq, identity)
        };
        self.meta.txn(|t| t.put(&rec))?;
        Ok(rec)
    }

    /// Mark a created device ready.
    fn finish(&self, mut rec: DeviceRecord) -> Result<DeviceRecord> {
        rec.state = DeviceState::Ready;
        self.meta.txn(|t| t.put(&rec))?;
        Ok(rec)
    }

    /// Undo a creation that failed after its intent was written.
    fn undo(&self, rec: &DeviceRecord, e: Error) -> Error {
        log::error!("creating {} failed, rolling back: {e}", self.log_name(rec));
        let cleaned = self
            .backend
            .delete(rec.dev)
            .and_then(|_| self.meta.txn(|t| t.remove(rec.id)));
        if let Err(c) = cleaned {
            log::error!(
                "rollback of {} incomplete ({c}); the next open finishes it",
                self.log_name(rec)
            );
        }
        e
    }

    /// Refuse the size of a new device that no image may have, or whose
    /// ext4 metadata alone the pool could not hold above its reserve (the
    /// one size rule of create, import and receive; the pool is thin, so
    /// nothing else bounds a virtual size). `what` says what is refused.
    pub(super) fn check_new_size(&self, size: Bytes, what: &str) -> Result<()> {
        if size.0 < MIN_DEVICE {
            return Err(Error::InvalidSize {
                input: size.human(),
                why: "an image must be at least 16M",
            });
        }
        if !size.0.is_multiple_of(4096) {
            return Err(Error::InvalidSize {
                input: size.human(),
                why: "an image size must be a multiple of 4 KiB",
            });
        }
        if size.0 > MAX_DEVICE {
            return Err(Error::NoSpace(format!(
                "cannot {what}: a device of {} ({} bytes) is larger than the largest ext4, {} ({} bytes)",
                size.approx(),
                size.0,
                Bytes(MAX_DEVICE).approx(),
                MAX_DEVICE
            )));
        }
        self.check_reserve(what)?;
        let meta = ext4_metadata(size.0);
        let st = self.backend.status()?;
        if st.available < self.config.reserve.0.saturating_add(meta) {
            return Err(Error::NoSpace(format!(
                "cannot {what}: mkfs of {size} writes about {} of metadata, which an ext4 of that size holds; the pool has {} free, and {} of reserve must stay",
                Bytes(meta).approx(),
                Bytes(st.available).approx(),
                self.config.reserve
            )));
        }
        Ok(())
    }

    /// Create an empty image with an ext4 filesystem.
    pub fn create_image(&self, name: &Name, size: Option<Bytes>) -> Result<DeviceRecord> {
        let size = size.unwrap_or(self.config.default_image_size);
        if self.meta.image_id(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("image {name}")));
        }
        self.check_new_size(size, &format!("create image {name}"))?;
        let rec = self.intent(name, DeviceKind::Image, None, size)?;
        failpoint("create.intent");
        let made = self.backend.create(rec.dev, size).and_then(|_| {
            failpoint("create.backend");
            self.mkfs(&rec)
        });
        if let Err(e) = made {
            return Err(self.undo(&rec, e));
        }
        failpoint("create.mkfs");
        let rec = self.finish(rec)?;
        failpoint("create.done");
        log::info!("created image {name} (id {}, {})", rec.id, rec.size);
        Ok(rec)
    }

    pub(super) fn mkfs(&self, rec: &DeviceRecord) -> Result<()> {
        let active = self.backend.activate(rec.dev, rec.size, false)?;
        let label: String = rec.name.as_str().chars().take(16).collect();
        let args: [&std::ffi::OsStr; 9] = [
            "-q".as_ref(),
            "-F".as_ref(),
            "-O".as_ref(),
            "metadata_csum_seed".as_ref(),
            "-E".as_ref(),
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard".as_ref(),
            "-L".as_ref(),
            label.as_ref(),
            active.path().as_os_str(),
        ];
        Tool::MkfsExt4.run(&format!("make the ext4 of {}", rec.name), args)?;
        Ok(())
    }

    /// Take a consistent snapshot `snap` of image `image`: the image's
    /// filesystem (if mounted) is flushed and frozen for the clone.
    pub fn snapshot(&self, image: DeviceId, snap: &Name) -> Result<DeviceRecord> {
        self.snapshot_with(image, snap, None)
    }

    /// A snapshot the daemon takes for its own use (a backup's head
    /// carrier, an export's source): marked with [`TEMPORARY_LABEL`] =
    /// `what` in the transaction that makes it ready, a mark no request
    /// and no restore can set ([`Engine::set_label`] refuses the key), so
    /// that a sweep at start takes only what a daemon made
    /// ([`is_temporary`]).
    pub fn snapshot_temporary(
        &self,
        image: DeviceId,
        snap: &Name,
        what: &str,
    ) -> Result<DeviceRecord> {
        self.snapshot_with(image, snap, Some(what))
    }

    fn snapshot_with(
        &self,
        image: DeviceId,
        snap: &Name,
        temporary: Option<&str>,
    ) -> Result<DeviceRecord> {
        let lock = self.lock_of(image);
        let _g = lock.lock();
        let img = self.ready(image)?;
        if img.kind == DeviceKind::Containerd {
            self.check_layer_snapshot(&img)?;
        } else if img.kind != DeviceKind::Image {
            return Err(Error::Invalid(format!(
                "{} is a snapshot; snapshots are taken of images",
                img.name
            )));
        }
        if self.meta.snapshot_id(image, snap)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {}@{snap}",
                img.name
            )));
        }
        self.check_reserve(&format!("snapshot {}@{snap}", img.name))?;
        let rec = self.intent(snap, DeviceKind::Snapshot, Some(image), img.size)?;
        failpoint("snapshot.intent");
        let started = std::time::Instant::now();
        // Most of the copy of a busy image, before it is frozen.
        if self.mounted(image).is_some()
            && let Err(e) = self.backend.prepare_snapshot(img.dev, rec.dev)
        {
            return Err(self.undo(&rec, e));
        }
        let frozen_for = match self.frozen(&img, || self.backend.snapshot(img.dev, rec.dev)) {
            Ok(((), d)) => d,
            Err(e) => return Err(self.undo(&rec, e)),
        };
        failpoint("snapshot.backend");
        let mut rec = rec;
        if let Some(what) = temporary {
            rec.labels
                .insert(TEMPORARY_LABEL.to_string(), what.to_string());
        }
        let rec = self.finish(rec)?;
        failpoint("snapshot.done");
        log::info!(
            "snapshot {}@{snap} taken (id {}) in {:.1} ms, image frozen for {:.1} ms",
            img.name,
            rec.id,
            started.elapsed().as_secs_f64() * 1e3,
            frozen_for.as_secs_f64() * 1e3
        );
        Ok(rec)
    }

    /// Run `f` with the filesystem of `img` flushed and frozen, if mounted
    /// (the one live mount users write through); if not, once an earlier
    /// mount has finished going (its last unmount writes the journal).
    /// Also returns how long writers of the image were stopped (zero when
    /// it was not mounted).
    fn frozen<T>(
        &self,
        img: &DeviceRecord,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, std::time::Duration)> {
        let id = img.id;
        let Some(m) = self.mounted(id) else {
            self.wait_unmounted(img.dev)?;
            return f().map(|v| (v, std::time::Duration::ZERO));
        };
        fsio::syncfs(m.root()).ctx(|| format!("flush filesystem of device id {id}"))?;
        let started = std::time::Instant::now();
        fsio::freeze(m.root()).ctx(|| format!("freeze filesystem of device id {id}"))?;
        failpoint("snapshot.frozen");
        let r = f();
        if let Err(e) = fsio::thaw(m.root()) {
            log::error!("thaw of device id {id} failed: {e}");
        }
        r.map(|v| (v, started.elapsed()))
    }

    /// Make a writable image `new` from snapshot `src`.
    pub fn clone_snapshot(&self, src: &Target, new: &Name) -> Result<DeviceRecord> {
        let snap = self.resolve(src)?;
        if snap.kind != DeviceKind::Snapshot {
            return Err(Error::Invalid(format!(
                "{src} is not a snapshot (clone takes NAME@SNAP)"
            )));
        }
        let lock = self.lock_of(snap.id);
        let _g = lock.lock();
        let snap = self.ready(snap.id)?;
        if self.meta.image_id(new)?.is_some() {
            return Err(Error::AlreadyExists(format!("image {new}")));
        }
        self.check_reserve(&format!("clone {src} to {new}"))?;
        let rec = self.intent(new, DeviceKind::Image, Some(snap.id), snap.size)?;
        failpoint("clone.intent");
        if let Err(e) = self.backend.snapshot(snap.dev, rec.dev) {
            return Err(self.undo(&rec, e));
        }
        failpoint("clone.backend");
        let rec = self.finish(rec)?;
        log::info!("cloned {src} to image {new} (id {})", rec.id);
        Ok(rec)
    }
}
