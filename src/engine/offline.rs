//! Taking devices offline: what rollback, destroy, fsck and offline resize
//! do before they touch a device, so that no mount of it is left and no
//! lookup mounts it again meanwhile (see [`super::mounts`] for the rule of
//! one live mount per device), and the trait through which the engine asks
//! the layer above (the FUSE mount) to let go of a device.

use super::Engine;
use super::mounts::{Mounted, OFFLINE_WAIT, RELEASE_WAIT, SETTLE_WAIT};
use crate::error::{Error, Result};
use crate::meta::DeviceRecord;
use crate::types::{DeviceId, DeviceKind};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Devices taken offline by one operation: their locks are held (lookups
/// wait) and their mounts are gone. Dropping it lets lookups in again.
pub struct Offline {
    _guards: Vec<parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()>>,
    /// Mounts marked closing, reopened on drop if they still live (the
    /// operation failed before they went).
    closing: Vec<Weak<Mounted>>,
    ids: Vec<DeviceId>,
}

impl Offline {
    /// The devices held offline.
    pub fn ids(&self) -> &[DeviceId] {
        &self.ids
    }

    /// Does this hold `id` offline?
    pub fn holds(&self, id: DeviceId) -> bool {
        self.ids.contains(&id)
    }
}

impl Drop for Offline {
    fn drop(&mut self) {
        for w in &self.closing {
            if let Some(m) = w.upgrade() {
                m.reopen();
            }
        }
    }
}

/// Where a device shows in the mount: what the layers above need to find
/// their cached entries of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Record id.
    pub id: DeviceId,
    /// Image or snapshot.
    pub kind: DeviceKind,
    /// The image of a snapshot (the snapshot of a clone).
    pub parent: Option<DeviceId>,
    /// Its name (within its image, for a snapshot).
    pub name: crate::types::Name,
}

impl From<&DeviceRecord> for DeviceEntry {
    fn from(r: &DeviceRecord) -> DeviceEntry {
        DeviceEntry {
            id: r.id,
            kind: r.kind,
            parent: r.parent,
            name: r.name.clone(),
        }
    }
}

/// What holds devices above the engine (the FUSE mount). The engine asks it
/// to drop its cached references before a device goes offline, and to
/// invalidate what the kernel caches once the operation is over.
pub trait Holders: Send + Sync {
    /// Drop every cached reference to the mount of device `d` (inodes);
    /// called with the device offline, so nothing new is made meanwhile.
    fn drop_cached(&self, d: &DeviceEntry);
    /// Tell the kernel that what it cached of `d` is gone or replaced;
    /// called after the device locks are released.
    fn invalidate(&self, d: &DeviceEntry);
}

/// EBUSY text: what was refused, where files are open, and by which
/// processes (a FUSE request names the thread; its process is reported).
fn busy_message(what: &str, name: &str, open: usize, tids: &[u32]) -> String {
    let mut pids: Vec<u32> = tids
        .iter()
        .map(|t| crate::sys::process::tgid_of(*t).unwrap_or(*t))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
    format!(
        "cannot {what}: {open} file(s) open in it ({name}, pid {})",
        list.join(", ")
    )
}

impl Engine {
    /// Take devices `recs` offline for an operation `what` (see the module
    /// doc). EBUSY with the pids when files are open in any of them; nothing
    /// has changed then.
    /// The locks of `also` are taken too (in the same ascending order, so
    /// that two operations never wait for each other), without taking those
    /// devices offline.
    fn take_offline(
        &self,
        recs: &[DeviceRecord],
        also: &[DeviceId],
        what: &str,
    ) -> Result<Offline> {
        let mut ids: Vec<DeviceId> = recs.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut locked: Vec<DeviceId> = ids.iter().chain(also).copied().collect();
        locked.sort_unstable();
        locked.dedup();
        let mut guards = Vec::with_capacity(locked.len());
        for id in &locked {
            let lock = self.lock_of(*id);
            let g = lock.try_lock_arc_for(OFFLINE_WAIT).ok_or_else(|| {
                Error::Busy(format!(
                    "cannot {what}: device id {id} is busy with another change"
                ))
            })?;
            guards.push(g);
        }
        let mut off = Offline {
            _guards: guards,
            closing: Vec::new(),
            ids,
        };
        let deadline = Instant::now() + SETTLE_WAIT;
        for r in recs {
            let Some(m) = self.live_mount(r.id) else {
                continue;
            };
            loop {
                match m.try_close() {
                    Ok(()) => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err((open, pids)) => {
                        return Err(Error::Busy(busy_message(
                            what,
                            &self.log_name(r),
                            open,
                            &pids,
                        )));
                    }
                }
            }
            off.closing.push(Arc::downgrade(&m));
        }
        for id in off.ids.clone() {
            self.pinned.lock().remove(&id);
        }
        Ok(off)
    }

    /// Run `f` with devices `recs` offline: taken offline, cached references
    /// above dropped, every superblock gone; afterwards the kernel is told
    /// to forget what it cached of them (after the locks are released, so a
    /// lookup waiting on a lock cannot deadlock with the invalidation).
    pub(super) fn with_offline<T>(
        &self,
        recs: &[DeviceRecord],
        what: &str,
        f: impl FnOnce(&Offline) -> Result<T>,
    ) -> Result<T> {
        self.with_offline_also(recs, &[], what, f)
    }

    /// [`Engine::with_offline`], holding the locks of `also` as well (in
    /// order with the others) without taking those devices offline.
    pub(super) fn with_offline_also<T>(
        &self,
        recs: &[DeviceRecord],
        also: &[DeviceId],
        what: &str,
        f: impl FnOnce(&Offline) -> Result<T>,
    ) -> Result<T> {
        let holders = self.holders.read().as_ref().and_then(Weak::upgrade);
        let r = {
            let off = self.take_offline(recs, also, what)?;
            if let Some(h) = &holders {
                for r in recs {
                    h.drop_cached(&r.into());
                }
            }
            let mut r = Ok(());
            for id in off.ids() {
                if let Err(e) = self.wait_released(*id, RELEASE_WAIT) {
                    r = Err(e);
                    break;
                }
            }
            r.and_then(|_| f(&off))
        };
        if let Some(h) = &holders {
            for rec in recs {
                h.invalidate(&rec.into());
            }
        }
        r
    }

    /// Where device `id` shows in the mount.
    pub fn entry(&self, id: DeviceId) -> Result<DeviceEntry> {
        Ok(DeviceEntry::from(&self.record(id)?))
    }

    /// Call `f` on the holders above, if any.
    pub(super) fn tell_holders(&self, f: impl FnOnce(&dyn Holders)) {
        if let Some(h) = self.holders.read().as_ref().and_then(Weak::upgrade) {
            f(h.as_ref());
        }
    }

    /// Install what holds devices above the engine (the FUSE layer).
    pub fn set_holders(&self, h: Weak<dyn Holders>) {
        *self.holders.write() = Some(h);
    }
}
