//! The engine: the image graph and its crash-safe operations.
//!
//! It owns the rules (names, kinds, parents, reserve), the order of steps of
//! every multi-step change, and the inner mounts of devices. Each change
//! writes its intent to sled first (`Creating`, `RollingBack`, or a `gc`
//! entry), then does the backend work, then records the result; [`recover`]
//! finishes or undoes whatever a crash interrupted. It never speaks FUSE.

pub mod containerd;
mod create;
mod import;
mod inspect;
mod modify;
mod mounts;
mod offline;
mod pool;
mod receive;
mod recover;
mod remove;
mod resume;
mod send;
pub mod space;
mod unchanged;

pub use create::{TEMPORARY_LABEL, is_temporary};
pub use import::Imported;
pub use inspect::{DeviceInfo, PoolInfo};
pub use mounts::{Mounted, OFFLINE_WAIT, OpenToken};
pub use offline::{DeviceEntry, Holders, Offline};
pub use pool::{BackendChoice, PoolOptions};
pub use receive::Received;
pub use resume::PartialInfo;
pub use send::{Progress, STREAM_BLOCK, SendStats};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::meta::{DeviceKind, DeviceRecord, DeviceState, Meta};
use crate::types::{Bytes, DeviceId, Name};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Settings of an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Size of new images when none is given.
    pub default_image_size: Bytes,
    /// New images and snapshots are refused when less than this is free.
    pub reserve: Bytes,
}

/// The engine over one pool.
pub struct Engine {
    meta: Meta,
    backend: Arc<dyn Backend>,
    config: EngineConfig,
    /// Held only while allocating an id and writing the intent record.
    alloc: Mutex<()>,
    /// One lock per image/snapshot id for changes that involve it.
    locks: Mutex<HashMap<DeviceId, Arc<Mutex<()>>>>,
    /// Mounts the engine keeps alive until idle expiry.
    pinned: Mutex<HashMap<DeviceId, Arc<Mounted>>>,
    /// Every live mount, pinned or not: at most one per device.
    live: Mutex<HashMap<DeviceId, std::sync::Weak<Mounted>>>,
    /// Live superblocks per backend device.
    census: Arc<mounts::Census>,
    /// The layer above (FUSE), told to let go of devices taken offline.
    holders: parking_lot::RwLock<Option<std::sync::Weak<dyn Holders>>>,
    /// Last id handed out.
    last_id: std::sync::atomic::AtomicU32,
    /// flock on the state directory, held while the engine lives.
    lock_file: Option<std::fs::File>,
    /// Devices kept attached for containerd (see `containerd.rs`).
    layer_devices: containerd::LayerDevices,
    /// The space guard's heartbeat, which fresh writable mounts wait on.
    guard_pulse: space::Pulse,
}

/// A reference to an image or snapshot by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Image name.
    pub image: Name,
    /// Snapshot name, if `NAME@SNAP`.
    pub snap: Option<Name>,
}

impl Target {
    /// Parse `NAME` or `NAME@SNAP`.
    pub fn parse(s: &str) -> Result<Target> {
        match s.split_once('@') {
            Some((i, sn)) => {
                if sn.is_empty() {
                    return Err(Error::InvalidName {
                        name: s.into(),
                        why: "nothing after '@' (expected NAME@SNAP)",
                    });
                }
                Ok(Target {
                    image: Name::new(i)?,
                    snap: Some(Name::new(sn)?),
                })
            }
            None => Ok(Target {
                image: Name::new(s)?,
                snap: None,
            }),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.snap {
            Some(s) => write!(f, "{}@{}", self.image, s),
            None => write!(f, "{}", self.image),
        }
    }
}

/// Crash-test hook: when `THINFS_FAILPOINT` names this point, the process
/// kills itself with SIGKILL right here, as a power cut would. Compiled in
/// only with the `failpoints` feature (test builds); a no-op otherwise.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint(_name: &str) {}

/// Crash-test hook: when `THINFS_FAILPOINT` names this point, the process
/// kills itself with SIGKILL right here, as a power cut would.
#[cfg(feature = "failpoints")]
pub fn failpoint(name: &str) {
    static FP: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let fp = FP.get_or_init(|| std::env::var("THINFS_FAILPOINT").ok());
    if fp.as_deref() == Some(name) {
        log::warn!("failpoint {name}: killing the process");
        // SAFETY: kill(2) on our own pid; no memory is involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Test hook: when `THINFS_FAILPOINT` names this point, the calling thread
/// panics here (a bug stand-in: what a panic in a stream's worker thread
/// does to its request). A no-op outside test builds.
#[cfg(not(feature = "failpoints"))]
pub fn panic_point(_name: &str) {}

/// Test hook: when `THINFS_FAILPOINT` names this point, the calling thread
/// panics here (a bug stand-in: what a panic in a stream's worker thread
/// does to its request). A no-op outside test builds.
#[cfg(feature = "failpoints")]
pub fn panic_point(name: &str) {
    static FP: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let fp = FP.get_or_init(|| std::env::var("THINFS_FAILPOINT").ok());
    if fp.as_deref() == Some(name) {
        panic!("failpoint {name}: a panic in a worker thread");
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Engine {
    /// Open the engine over `meta` and `backend`, then reconcile them
    /// (finish or undo what a crash left half-done).
    pub fn open(meta: Meta, backend: Arc<dyn Backend>, config: EngineConfig) -> Result<Engine> {
        if let Some(gone) = crate::sys::tools::missing(&crate::sys::tools::Tool::REQUIRED) {
            return Err(Error::io(
                format!("thinfs needs {gone}"),
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        if let Some(gone) = crate::sys::tools::missing(&[crate::sys::tools::Tool::Resize2fs]) {
            log::warn!("{gone} is missing: images can be grown online only");
        }
        let e = Engine {
            meta,
            backend,
            config,
            alloc: Mutex::new(()),
            locks: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            census: Arc::default(),
            holders: parking_lot::RwLock::new(None),
            lock_file: None,
            last_id: std::sync::atomic::AtomicU32::new(0),
            layer_devices: Default::default(),
            guard_pulse: Default::default(),
        };
        e.recover()?;
        // Keep the backend's transaction id (dm-thin) in step with sled's.
        // They differ only if a crash fell between the two; recovery above
        // has reconciled the records with the backend already.
        let meta_txid = e.meta.pool()?.map(|p| p.transaction_id).unwrap_or(0);
        if let Some(pool_txid) = e.backend.transaction_id()? {
            if pool_txid != meta_txid {
                log::warn!(
                    "recovery: backend transaction id {pool_txid} differs from the metadata's {meta_txid} (a crash fell between them); reconciled"
                );
            }
            e.backend.set_transaction_id(meta_txid)?;
            let b = e.backend.clone();
            e.meta.set_commit_hook(Box::new(move |id| {
                if let Err(err) = b.set_transaction_id(id) {
                    log::error!("cannot set the backend transaction id to {id}: {err}");
                }
            }));
        }
        Ok(e)
    }

    /// Every device record, in id order (the metadata store itself stays
    /// private to the engine).
    pub fn records(&self) -> Result<Vec<crate::meta::DeviceRecord>> {
        self.meta.list()
    }

    /// Hidden devices of receives under way (a crash leaves them here; the
    /// next open moves them to the devices to free).
    pub fn receiving_pending(&self) -> Result<Vec<crate::types::DeviceId>> {
        self.meta.receiving_list()
    }

    /// Backend devices whose records are gone and whose blocks are still
    /// to be freed (finished at the next open).
    pub fn gc_pending(&self) -> Result<Vec<crate::types::DeviceId>> {
        self.meta.gc_list()
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn lock_of(&self, id: DeviceId) -> Arc<Mutex<()>> {
        self.locks.lock().entry(id).or_default().clone()
    }

    /// Resolve a target to its record.
    pub fn resolve(&self, t: &Target) -> Result<DeviceRecord> {
        let img = match self.meta.image_id(&t.image)? {
            Some(i) => i,
            // Users' snapshots of containerd's committed layers (`ctd-N@SNAP`).
            None if t.snap.is_some() => self.layer_id(&t.image)?,
            None => return Err(Error::NotFound(format!("no image named {}", t.image))),
        };
        let id = match &t.snap {
            None => img,
            Some(s) => self
                .meta
                .snapshot_id(img, s)?
                .ok_or_else(|| Error::NotFound(format!("image {} has no snapshot {s}", t.image)))?,
        };
        self.record(id)
    }

    /// The record of `id`.
    pub fn record(&self, id: DeviceId) -> Result<DeviceRecord> {
        self.meta
            .get(id)?
            .ok_or_else(|| Error::NotFound(format!("no device with id {id}")))
    }

    /// The record of `id`, which must be `Ready`.
    fn ready(&self, id: DeviceId) -> Result<DeviceRecord> {
        let r = self.record(id)?;
        match r.state {
            DeviceState::Ready => Ok(r),
            DeviceState::Faulty => Err(Error::Faulty {
                name: r.name.to_string(),
                reason: r.error.unwrap_or_default(),
            }),
            s => Err(Error::Busy(format!("{} is {s:?}", r.name))),
        }
    }

    /// Image id by name.
    pub fn image_id(&self, name: &Name) -> Result<Option<DeviceId>> {
        self.meta.image_id(name)
    }

    /// Snapshot id by image and name.
    pub fn snapshot_id(&self, image: DeviceId, name: &Name) -> Result<Option<DeviceId>> {
        self.meta.snapshot_id(image, name)
    }

    /// Snapshots of an image, by name.
    pub fn snapshots_of(&self, image: DeviceId) -> Result<Vec<DeviceRecord>> {
        let mut v = Vec::new();
        for c in self.meta.children(image)? {
            if let Some(r) = self.meta.get(c)?
                && r.kind == DeviceKind::Snapshot
            {
                v.push(r);
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Images (top-level directories), by name.
    pub fn images(&self) -> Result<Vec<DeviceRecord>> {
        let mut v: Vec<_> = self
            .meta
            .list()?
            .into_iter()
            .filter(|r| r.kind == DeviceKind::Image)
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Whether the pool can take `step` more bytes of a writer the space
    /// guard does not watch (an import's or a receive's hidden device,
    /// reachable by no path) and still keep the guard's margin for the
    /// images' writers; else ENOSPC naming the pool and what is free. The
    /// caller syncs what it wrote first, so that it is counted.
    pub fn pool_has_room(&self, what: &str, step: u64) -> Result<()> {
        let st = self.backend.status()?;
        let need = space::MARGIN.saturating_add(step.saturating_mul(2));
        if st.available < need {
            return Err(Error::NoSpace(format!(
                "{what}: the pool is full ({}: {} free, {} kept for the images' writers)",
                st.detail,
                Bytes(st.available),
                Bytes(space::MARGIN)
            )));
        }
        Ok(())
    }

    /// `e` of a writer the guard does not watch, as ENOSPC naming the
    /// pool when the pool is what ran out (another writer filled it
    /// between two [`Engine::pool_has_room`] checks: the device's writes
    /// failed with EIO); else `e` unchanged.
    pub fn full_pool_error(&self, what: &str, e: Error) -> Error {
        if matches!(e, Error::NoSpace(_)) {
            return e;
        }
        match self.backend.status() {
            Ok(st) if st.available < space::MARGIN => Error::NoSpace(format!(
                "{what}: the pool is full ({}: {} free): {e}",
                st.detail,
                Bytes(st.available)
            )),
            _ => e,
        }
    }

    /// Refuse new devices when the pool is below its reserve.
    fn check_reserve(&self, what: &str) -> Result<()> {
        let st = self.backend.status()?;
        if st.available < self.config.reserve.0 {
            return Err(Error::NoSpace(format!(
                "cannot {what}: pool has {} free, below the reserve of {}",
                Bytes(st.available),
                self.config.reserve
            )));
        }
        Ok(())
    }

    /// Allocate a free device id (not used by any record, pending device,
    /// gc entry or backend device). Ids rise and wrap around, so a freed id
    /// is not handed out again soon. Caller holds `alloc`.
    fn alloc_dev(&self) -> Result<DeviceId> {
        let mut used = self.meta.used_devs()?;
        for d in self.backend.list()? {
            used.insert(d.get());
        }
        let start = self
            .last_id
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(*used.last().unwrap_or(&0));
        let mut cand = start;
        for _ in 0..=DeviceId::MAX {
            cand = if cand >= DeviceId::MAX { 1 } else { cand + 1 };
            if !used.contains(&cand) {
                self.last_id
                    .store(cand, std::sync::atomic::Ordering::Relaxed);
                return DeviceId::new(cand);
            }
        }
        Err(Error::NoSpace("all 2^24 device ids are in use".into()))
    }
}
