//! Inner mounts: each device's filesystem, mounted detached on demand.

use super::Engine;
use crate::backend::ActiveDevice;
use crate::error::{IoContext, Result};
use crate::meta::DeviceKind;
use crate::sys::{fsio, mount};
use crate::types::DeviceId;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A device's filesystem, mounted detached. The mount lives while this (or
/// any file opened through it) lives; then the kernel drops the mount and
/// the autoclear loop device under it.
#[derive(Debug)]
pub struct Mounted {
    /// Root directory of the mounted filesystem. Declared first: dropped
    /// before the device it sits on.
    root: OwnedFd,
    active: Box<dyn ActiveDevice>,
    /// Record id.
    pub id: DeviceId,
    /// Backend device id it was mounted from.
    pub dev: DeviceId,
    /// Mounted read-only (snapshots).
    pub read_only: bool,
    last_used: AtomicU64,
}

impl Mounted {
    /// The root directory fd.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Note a use (for idle expiry).
    pub fn touch(&self) {
        self.last_used.store(super::now_secs(), Ordering::Relaxed);
    }

    /// Make it the first candidate for idle expiry (nobody has used it yet:
    /// a snapshot just taken by mkdir need not stay mounted).
    pub fn mark_idle(&self) {
        self.last_used.store(0, Ordering::Relaxed);
    }

    /// Seconds since the epoch of the last use.
    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// The block device under it.
    pub fn device(&self) -> &dyn ActiveDevice {
        self.active.as_ref()
    }
}

impl Engine {
    /// The mounted filesystem of `id`, mounting it if needed.
    pub fn mount(&self, id: DeviceId) -> Result<Arc<Mounted>> {
        if let Some(m) = self.mounts.lock().get(&id) {
            m.touch();
            return Ok(m.clone());
        }
        let lock = self.lock_of(id);
        let _g = lock.lock();
        if let Some(m) = self.mounts.lock().get(&id) {
            return Ok(m.clone());
        }
        let r = self.ready(id)?;
        let ro = r.kind == DeviceKind::Snapshot;
        let m = Arc::new(self.mount_dev(&r, ro)?);
        m.touch();
        log::info!(
            "mounted {} (id {}, dev {}, {})",
            r.name,
            r.id,
            r.dev,
            if ro { "ro" } else { "rw" }
        );
        self.mounts.lock().insert(id, m.clone());
        Ok(m)
    }

    pub(super) fn mount_dev(&self, r: &crate::meta::DeviceRecord, ro: bool) -> Result<Mounted> {
        let (id, dev, fs) = (r.id, r.dev, r.fs.as_str());
        let active = self.backend.activate(dev, r.size, ro)?;
        let flags: &[&str] = if ro { &[] } else { &["discard"] };
        let root = mount::fsmount_detached(fs, active.path(), ro, flags, &[]).ctx(|| {
            format!(
                "mount {fs} of device {dev} from {}",
                active.path().display()
            )
        })?;
        active.mounted();
        Ok(Mounted {
            root,
            active,
            id,
            dev,
            read_only: ro,
            last_used: AtomicU64::new(0),
        })
    }

    /// The mount of `id` if it is mounted.
    pub fn mounted(&self, id: DeviceId) -> Option<Arc<Mounted>> {
        self.mounts.lock().get(&id).cloned()
    }

    /// Forget the mount of `id`: the kernel drops it once the last file
    /// opened through it is closed.
    pub fn unmount(&self, id: DeviceId) {
        if let Some(m) = self.mounts.lock().remove(&id) {
            let _ = fsio::syncfs(m.root());
            self.retired.lock().insert(id, Arc::downgrade(&m));
            log::info!("unmounted device id {id}");
        }
    }

    /// Wait until the filesystem of `id` is really gone (every user of an
    /// earlier mount dropped it), so that the device can be used offline.
    pub fn wait_released(&self, id: DeviceId, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let alive = self
                .retired
                .lock()
                .get(&id)
                .map(|w| w.strong_count() > 0)
                .unwrap_or(false)
                || self.mounted(id).is_some();
            if !alive {
                self.retired.lock().remove(&id);
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(crate::error::Error::Busy(format!(
                    "device id {id} is still in use"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Filesystems really mounted now: those in the table plus unmounted
    /// ones still held (by cached inodes or open files).
    pub fn live_mounts(&self) -> usize {
        let mut ids: std::collections::HashSet<DeviceId> =
            self.mounts.lock().keys().copied().collect();
        self.retired.lock().retain(|id, w| {
            let alive = w.strong_count() > 0;
            if alive {
                ids.insert(*id);
            }
            alive
        });
        ids.len()
    }

    /// Ids of mounted devices, with their last use.
    pub fn mounted_ids(&self) -> Vec<(DeviceId, u64, usize)> {
        self.mounts
            .lock()
            .iter()
            .map(|(id, m)| (*id, m.last_used(), Arc::strong_count(m)))
            .collect()
    }

    /// Flush and drop every mount (shutdown).
    pub fn unmount_all(&self) {
        let all: Vec<_> = self.mounts.lock().drain().collect();
        for (_, m) in all {
            let _ = fsio::syncfs(m.root());
        }
    }
}
