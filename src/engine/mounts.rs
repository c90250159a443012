//! Inner mounts: each device's filesystem, mounted detached on demand, and
//! the one rule that keeps them safe: **at most one live superblock per
//! device**.
//!
//! A [`Mounted`] lives while anything holds it: the engine's own pin (until
//! idle expiry), every cached inode of the FUSE layer (until the kernel's
//! FORGET), every open file or directory ([`OpenToken`]). The engine keeps
//! a weak reference to every live mount, so a device that is still held
//! (a shell's cwd, an inotify watch) is reused, never mounted a second time.
//!
//! Operations that need a device unmounted (rollback, destroy, fsck,
//! offline resize) take it offline ([`super::Offline`], in `offline.rs`): under the device's lock they refuse
//! (EBUSY, nothing changed) while files are open in it, otherwise they mark
//! the mount closing (no new opens, no new inodes), let the layers above drop
//! their cached references, and wait until the superblock is really gone.
//! Lookups meanwhile wait on the device lock (bounded) instead of mounting.

use super::Engine;
use crate::backend::ActiveDevice;
use crate::error::{Error, IoContext, Result};
use crate::meta::{DeviceKind, DeviceRecord};
use crate::sys::{fsio, mount};
use crate::types::DeviceId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How long a lookup waits for an operation that has the device offline.
pub const OFFLINE_WAIT: Duration = Duration::from_secs(30);
/// How long an operation waits for the last users of a mount to let go.
pub(super) const RELEASE_WAIT: Duration = Duration::from_secs(10);
/// How long an operation waits for just-closed files (the kernel sends
/// RELEASE asynchronously after the last close(2), and on a loaded machine
/// it may come well after a `close; rollback` has started). A file that is
/// really open makes the operation fail with EBUSY after this wait.
pub(super) const SETTLE_WAIT: Duration = Duration::from_secs(2);

/// Counts live superblocks per device (a mount is counted from the moment
/// it is made until its last reference is dropped and the kernel let go).
#[derive(Debug, Default)]
pub struct Census {
    live: Mutex<HashMap<DeviceId, usize>>,
    max_per_device: AtomicUsize,
}

impl Census {
    fn enter(self: &Arc<Self>, dev: DeviceId) -> CensusToken {
        let mut m = self.live.lock();
        let n = m.entry(dev).or_default();
        *n += 1;
        if *n > 1 {
            log::error!(
                "BUG: {n} live mounts of backend device {dev}: a filesystem is mounted twice"
            );
        }
        self.max_per_device.fetch_max(*n, Ordering::Relaxed);
        CensusToken {
            census: self.clone(),
            dev,
        }
    }

    /// Mounts of backend device `dev` not yet fully gone.
    fn count(&self, dev: DeviceId) -> usize {
        self.live.lock().get(&dev).copied().unwrap_or(0)
    }

    /// Wait until every mount of backend device `dev` is fully gone (the
    /// last reference may be dropping on another thread right now).
    fn wait_gone(&self, dev: DeviceId, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.count(dev) > 0 {
            if Instant::now() > deadline {
                return Err(Error::Busy(format!(
                    "backend device {dev} is still being unmounted after {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Live superblocks now, and the most ever seen at once for one device.
    pub fn counts(&self) -> (usize, usize) {
        let live = self.live.lock().values().sum();
        (live, self.max_per_device.load(Ordering::Relaxed))
    }
}

/// Held by a [`Mounted`] as its last field: leaves the census once the
/// root fd and the block device have been closed.
#[derive(Debug)]
struct CensusToken {
    census: Arc<Census>,
    dev: DeviceId,
}

impl Drop for CensusToken {
    fn drop(&mut self) {
        let mut m = self.census.live.lock();
        if let Some(n) = m.get_mut(&self.dev) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.dev);
            }
        }
    }
}

/// Open files of a mount and whether it is closing, changed together.
#[derive(Debug, Default)]
struct OpenState {
    closing: bool,
    /// Open handle serial -> pid of the process that opened it.
    openers: HashMap<u64, u32>,
    next: u64,
}

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
    open: Mutex<OpenState>,
    /// Declared last: counted until everything above is closed.
    _census: CensusToken,
}

/// One open file or directory of a mount: while it lives, the device cannot
/// be taken offline. Keep it in the handle, after the file it guards.
#[derive(Debug)]
pub struct OpenToken {
    mount: Arc<Mounted>,
    serial: u64,
}

impl Drop for OpenToken {
    fn drop(&mut self) {
        self.mount.open.lock().openers.remove(&self.serial);
    }
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

    /// Is an operation taking this device offline? Then no new inode or
    /// open file may be made on it.
    pub fn closing(&self) -> bool {
        self.open.lock().closing
    }

    /// Register an open file or directory by process `pid`; refused while
    /// the device is being taken offline.
    pub fn open_token(self: &Arc<Self>, pid: u32) -> Result<OpenToken> {
        let mut st = self.open.lock();
        if st.closing {
            return Err(Error::Busy(format!(
                "device id {} is being changed (rollback, destroy or fsck); try again",
                self.id
            )));
        }
        st.next += 1;
        let serial = st.next;
        st.openers.insert(serial, pid);
        Ok(OpenToken {
            mount: self.clone(),
            serial,
        })
    }

    /// Number of open files and directories.
    pub fn open_files(&self) -> usize {
        self.open.lock().openers.len()
    }

    /// Mark closing if nothing is open; else the pids holding files open.
    pub(super) fn try_close(&self) -> std::result::Result<(), (usize, Vec<u32>)> {
        let mut st = self.open.lock();
        if st.openers.is_empty() {
            st.closing = true;
            return Ok(());
        }
        let mut pids: Vec<u32> = st.openers.values().copied().collect();
        pids.sort_unstable();
        pids.dedup();
        Err((st.openers.len(), pids))
    }

    pub(super) fn reopen(&self) {
        self.open.lock().closing = false;
    }
}

impl Engine {
    /// The mounted filesystem of `id`, mounting it if needed. A device that
    /// is still mounted (even if only a cached inode holds it) is reused.
    /// While an operation has the device offline this waits (at most
    /// [`OFFLINE_WAIT`]), then fails with EBUSY.
    pub fn mount(&self, id: DeviceId) -> Result<Arc<Mounted>> {
        if let Some(m) = self.pinned.lock().get(&id)
            && !m.closing()
        {
            m.touch();
            return Ok(m.clone());
        }
        let lock = self.lock_of(id);
        let Some(_g) = lock.try_lock_for(OFFLINE_WAIT) else {
            return Err(Error::Busy(format!(
                "device id {id} is being changed (rollback, destroy or fsck) for more than {} s",
                OFFLINE_WAIT.as_secs()
            )));
        };
        if let Some(m) = self.live_mount(id) {
            // Offline operations reopen what they leave alive; a mount still
            // closing here belongs to no operation.
            m.reopen();
            m.touch();
            self.pinned.lock().insert(id, m.clone());
            return Ok(m);
        }
        let r = self.ready(id)?;
        let ro = r.kind == DeviceKind::Snapshot;
        // The last holder of an earlier mount may be dropping it right now:
        // its superblock must be gone before the device is mounted again.
        self.census.wait_gone(r.dev, RELEASE_WAIT)?;
        let m = Arc::new(self.mount_dev(&r, ro)?);
        m.touch();
        log::info!(
            "mounted {} (id {}, dev {}, {})",
            self.log_name(&r),
            r.id,
            r.dev,
            if ro { "ro" } else { "rw" }
        );
        self.live.lock().insert(id, Arc::downgrade(&m));
        self.pinned.lock().insert(id, m.clone());
        // Nothing may write into a fresh filesystem on a tight pool before
        // the space guard has set its reserve.
        if !ro && !self.guard_pulse.wait_seen() {
            log::warn!(
                "space guard did not look at {} within its wait: it runs unguarded until the next tick",
                self.log_name(&r)
            );
        }
        Ok(m)
    }

    /// Mount a device's filesystem (not entered in the tables).
    pub(super) fn mount_dev(&self, r: &DeviceRecord, ro: bool) -> Result<Mounted> {
        let (id, dev, fs) = (r.id, r.dev, r.fs.as_str());
        let active = self.backend.activate(dev, r.size, ro)?;
        let census = self.census.enter(dev);
        // noinit_itable: no background zeroing of inode tables that mkfs
        // left uninitialised (lazy_itable_init). On a thin device they are
        // unallocated and read as zeros already, and the zeroing writes
        // would make a merely mounted image differ from its newest
        // snapshot (an incremental receive would refuse it).
        let flags: &[&str] = match (ro, fs) {
            (true, _) => &[],
            (false, "ext4") => &["discard", "noinit_itable"],
            (false, _) => &["discard"],
        };
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
            open: Mutex::new(OpenState::default()),
            _census: census,
        })
    }

    /// The live mount of `id`, if its superblock is alive (pinned or held).
    pub(super) fn live_mount(&self, id: DeviceId) -> Option<Arc<Mounted>> {
        if let Some(m) = self.pinned.lock().get(&id) {
            return Some(m.clone());
        }
        let mut live = self.live.lock();
        match live.get(&id).map(Weak::upgrade) {
            Some(Some(m)) => Some(m),
            Some(None) => {
                live.remove(&id);
                None
            }
            None => None,
        }
    }

    /// Wait until no mount of backend device `dev` is left, even one whose
    /// last reference is being dropped on another thread.
    pub(super) fn wait_unmounted(&self, dev: DeviceId) -> Result<()> {
        self.census.wait_gone(dev, RELEASE_WAIT)
    }

    /// The mount of `id` if its filesystem is mounted (by anyone).
    pub fn mounted(&self, id: DeviceId) -> Option<Arc<Mounted>> {
        self.live_mount(id)
    }

    /// Let go of the engine's own hold on the mount of `id` (idle expiry):
    /// the filesystem goes once nothing else holds it, and is reused if
    /// looked up before that.
    pub fn unmount(&self, id: DeviceId) {
        if let Some(m) = self.pinned.lock().remove(&id) {
            let _ = fsio::syncfs(m.root());
            log::info!("released device id {id} (unmounted once unused)");
        }
    }

    /// Wait until the filesystem of `id` is really gone (every user of an
    /// earlier mount dropped it), so that the device can be used offline.
    pub fn wait_released(&self, id: DeviceId, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let held = {
                let live = self.live.lock();
                live.get(&id).map(|w| w.strong_count()).unwrap_or(0)
            } + self.pinned.lock().contains_key(&id) as usize;
            if held == 0 {
                self.live.lock().remove(&id);
                // Dropped, but perhaps still closing on another thread.
                return match self.record(id) {
                    Ok(r) => self
                        .census
                        .wait_gone(r.dev, deadline.saturating_duration_since(Instant::now())),
                    Err(_) => Ok(()),
                };
            }
            if Instant::now() > deadline {
                return Err(Error::Busy(format!(
                    "device id {id} is still in use ({held} reference(s) after {} s)",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ids of devices the engine holds mounted, with their last use and
    /// open files.
    pub fn mounted_ids(&self) -> Vec<(DeviceId, u64, usize)> {
        self.pinned
            .lock()
            .iter()
            .map(|(id, m)| (*id, m.last_used(), m.open_files()))
            .collect()
    }

    /// Every live mount, pinned or only held (a cwd, a cached inode): what
    /// can still be written through.
    pub fn live_mounts_all(&self) -> Vec<Arc<Mounted>> {
        let mut out: Vec<Arc<Mounted>> = self.pinned.lock().values().cloned().collect();
        let live = self.live.lock();
        for (id, w) in live.iter() {
            if out.iter().any(|m| m.id == *id) {
                continue;
            }
            if let Some(m) = w.upgrade() {
                out.push(m);
            }
        }
        out
    }

    /// Filesystems really mounted now (pinned or still held).
    pub fn live_mounts(&self) -> usize {
        self.census.counts().0
    }

    /// Live superblocks now and the most ever seen at once for one device
    /// (never more than 1 unless there is a bug).
    pub fn mount_census(&self) -> (usize, usize) {
        self.census.counts()
    }

    /// Flush and drop every mount (shutdown).
    pub fn unmount_all(&self) {
        let all: Vec<_> = self.pinned.lock().drain().collect();
        for (_, m) in all {
            let _ = fsio::syncfs(m.root());
        }
    }
}
