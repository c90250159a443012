//! The dm-thin pool: set up, recover, thin devices, status.

use super::adopt;
use super::delta;
use super::probe::{available, dmerr};
use crate::backend::{ActiveDevice, Backend, ChangedRange, PoolStatus, Usage, compare_by_reading};
use crate::error::{Error, IoContext, Result};
use crate::sys::loopdev::LoopDevice;
use crate::types::{Bytes, DeviceId};
use devicemapper::{
    DM, DataBlocks, DevId, Device, DmDevice, DmFlags, DmName, DmNameBuf, DmOptions, LinearDev,
    LinearDevTargetParams, LinearTargetParams, Sectors, TargetLine, ThinDev, ThinDevId,
    ThinPoolDev, ThinPoolStatus, ThinStatus,
};
use parking_lot::Mutex;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Data block size: 64 KiB.
const BLOCK_SECTORS: u64 = 128;
const META_FILE: &str = "dm-meta.img";
const DATA_FILE: &str = "dm-data.img";

struct Shared {
    dm: DM,
    tag: String,
    /// The pool (it owns its metadata and data linear devices).
    pool: Mutex<Option<ThinPoolDev>>,
    _loops: Vec<LoopDevice>,
    detail: String,
    /// The pool's one metadata snapshot, for changed ranges.
    meta_snap: delta::MetaSnap,
}

impl Shared {
    fn name(&self, what: &str) -> Result<DmNameBuf> {
        DmNameBuf::new(format!("thinfs-{}-{what}", self.tag)).map_err(|e| dmerr("dm name", e))
    }

    fn msg(&self, m: &str) -> Result<()> {
        let name = self.name("pool")?;
        self.dm
            .target_msg(&DevId::Name(&name), None, m)
            .map(|_| ())
            .map_err(|e| dmerr(format!("thin-pool message {m:?}"), e))
    }

    fn thin_name(&self, dev: DeviceId) -> Result<DmNameBuf> {
        self.name(&dev.get().to_string())
    }

    /// The block device node (`/dev/dm-N`) of active thin device `dev`.
    fn active_node(&self, dev: DeviceId) -> Result<PathBuf> {
        let name = self.thin_name(dev)?;
        let info = self
            .dm
            .device_info(&DevId::Name(&name))
            .map_err(|e| dmerr(format!("look up active thin device {dev}"), e))?;
        Ok(PathBuf::from(format!("/dev/dm-{}", info.device().minor)))
    }

    fn is_active(&self, dev: DeviceId) -> Result<bool> {
        let n = self.thin_name(dev)?;
        devicemapper::device_exists(&self.dm, &n).map_err(|e| dmerr("device lookup", e))
    }

    fn remove(&self, name: &DmName) {
        let id = DevId::Name(name);
        let _ = self.dm.device_suspend(&id, DmOptions::default());
        for _ in 0..50 {
            if self.dm.device_remove(&id, DmOptions::default()).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = self.dm.device_remove(
            &id,
            DmOptions::default().set_flags(DmFlags::DM_DEFERRED_REMOVE),
        ) {
            log::error!("cannot remove dm device {name}: {e}");
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Active thin devices are gone (each holds an Arc of this); take the
        // pool down, with its linear devices, so the loop devices under it
        // autoclear.
        if let Some(mut p) = self.pool.lock().take()
            && let Err(e) = p.teardown(&self.dm)
        {
            log::error!("tearing down the dm pool failed: {e}");
        }
    }
}

/// An open dm-thin pool.
pub struct DmPool(Arc<Shared>);

fn tag_of(state: &Path) -> String {
    let p = std::fs::canonicalize(state).unwrap_or_else(|_| state.to_path_buf());
    // FNV-1a: a short stable tag per state directory.
    let mut h: u32 = 0x811c9dc5;
    for b in p.to_string_lossy().bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    format!("{h:08x}")
}

fn device_of(path: &Path) -> Result<Device> {
    let rdev = std::fs::metadata(path)
        .ctx(|| format!("stat {}", path.display()))?
        .rdev();
    Ok(Device::from(rdev as libc::dev_t))
}

fn sparse(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("create {}", path.display()))?;
    f.set_len(size).ctx(|| format!("size {}", path.display()))
}

impl DmPool {
    /// Open the pool in `state`, creating it (`size` bytes of data) if new.
    /// Leftover dm devices of a crashed daemon are torn down first.
    pub fn open(state: &Path, size: Bytes) -> Result<DmPool> {
        available().map_err(Error::Invalid)?;
        let dm = DM::new().map_err(|e| dmerr("open /dev/mapper/control", e))?;
        let tag = tag_of(state);
        let kept = adopt::leftovers(&dm, &tag)?;
        let meta_path: PathBuf = state.join(META_FILE);
        let data_path: PathBuf = state.join(DATA_FILE);
        let fresh = !data_path.exists();
        let data_size = if fresh {
            size.0 / (BLOCK_SECTORS * 512) * (BLOCK_SECTORS * 512)
        } else {
            std::fs::metadata(&data_path)
                .ctx(|| "stat data file".into())?
                .len()
        };
        if data_size < 64 << 20 {
            return Err(Error::InvalidSize {
                input: Bytes(data_size).human(),
                why: "a dm pool needs at least 64M of data",
            });
        }
        // 48 bytes of metadata per data block, at least 16M, at most 16G.
        let meta_size =
            ((data_size / (BLOCK_SECTORS * 512)) * 48).clamp(16 << 20, 16 << 30) / 4096 * 4096;
        if fresh {
            let _ = std::fs::remove_file(&meta_path);
            sparse(&meta_path, meta_size)?;
            sparse(&data_path, data_size)?;
        }
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .ctx(|| format!("open {}", p.display()))
        };
        let meta_file = open(&meta_path)?;
        let meta_len = meta_file.metadata().ctx(|| "stat meta".into())?.len();
        // A pool kept for a thin device mounted outside thinfs keeps its
        // loop devices: use them again, never a second one on a file.
        let attach = |file: &std::fs::File, path: &Path, what: &str| -> Result<LoopDevice> {
            if !kept.is_empty()
                && let Some(l) = adopt::existing_loop(path)?
            {
                return Ok(l);
            }
            LoopDevice::attach(file, false, what).ctx(|| format!("attach {}", path.display()))
        };
        let ml = attach(&meta_file, &meta_path, "thinfs-dm-meta")?;
        let dl = attach(&open(&data_path)?, &data_path, "thinfs-dm-data")?;
        let name =
            |w: &str| DmNameBuf::new(format!("thinfs-{tag}-{w}")).map_err(|e| dmerr("dm name", e));
        let linear = |w: &str, lo: &LoopDevice, len: u64| -> Result<LinearDev> {
            let table = vec![TargetLine::new(
                Sectors(0),
                Sectors(len / 512),
                LinearDevTargetParams::Linear(LinearTargetParams::new(
                    device_of(lo.path())?,
                    Sectors(0),
                )),
            )];
            LinearDev::setup(&dm, &name(w)?, None, table)
                .map_err(|e| dmerr(format!("linear device {w}"), e))
        };
        let meta = linear("meta", &ml, meta_len)?;
        let data = linear("data", &dl, data_size)?;
        let features = vec!["error_if_no_space".to_string()];
        // Low water mark: 1% of the data blocks.
        let lwm = DataBlocks((data_size / (BLOCK_SECTORS * 512) / 100).max(1));
        let pool = if fresh {
            ThinPoolDev::new(
                &dm,
                &name("pool")?,
                None,
                meta,
                data,
                Sectors(BLOCK_SECTORS),
                lwm,
                features,
            )
        } else {
            ThinPoolDev::setup(
                &dm,
                &name("pool")?,
                None,
                meta,
                data,
                Sectors(BLOCK_SECTORS),
                lwm,
                features,
            )
        }
        .map_err(|e| dmerr("thin-pool", e))?;
        delta::release_leftover(&dm, &pool)?;
        let detail = format!(
            "dm-thin pool thinfs-{tag}-pool: data {} in {}, metadata {} in {}, 64K blocks",
            Bytes(data_size),
            data_path.display(),
            Bytes(meta_len),
            meta_path.display()
        );
        Ok(DmPool(Arc::new(Shared {
            dm,
            tag,
            pool: Mutex::new(Some(pool)),
            _loops: vec![ml, dl],
            detail,
            meta_snap: delta::MetaSnap::default(),
        })))
    }

    fn with_pool<T>(&self, f: impl FnOnce(&ThinPoolDev) -> Result<T>) -> Result<T> {
        let g = self.0.pool.lock();
        let p = g
            .as_ref()
            .ok_or_else(|| Error::Invalid("dm pool is closed".into()))?;
        f(p)
    }

    fn thin_id(dev: DeviceId) -> Result<ThinDevId> {
        ThinDevId::new_u64(dev.get() as u64).map_err(|e| dmerr("thin id", e))
    }

    /// Activate `dev` for a moment to read its status or check it exists.
    fn probe(&self, dev: DeviceId) -> Result<ThinStatus> {
        let s = &self.0;
        let name = self.0.name(&format!("probe-{}", dev.get()))?;
        let mut t = self.with_pool(|p| {
            ThinDev::setup(&s.dm, &name, None, Sectors(8), p, Self::thin_id(dev)?)
                .map_err(|e| dmerr("probe", e))
        })?;
        let st = t.status(&s.dm, DmOptions::default());
        let _ = t.teardown(&s.dm);
        st.map_err(|e| dmerr("thin status", e))
    }
}

/// A thin device activated as a block device; removed on drop.
struct DmActive {
    shared: Arc<Shared>,
    dev: Mutex<ThinDev>,
    path: PathBuf,
}

impl std::fmt::Debug for DmActive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmActive({})", self.path.display())
    }
}

impl ActiveDevice for DmActive {
    fn path(&self) -> &Path {
        &self.path
    }

    fn refresh_capacity(&self, size: Bytes) -> Result<()> {
        let mut d = self.dev.lock();
        let mut line = d.table().table.clone();
        line.length = Sectors(size.0 / 512);
        d.set_table(&self.shared.dm, line)
            .map_err(|e| dmerr("grow thin device", e))
    }
}

impl Drop for DmActive {
    fn drop(&mut self) {
        let name = self.dev.lock().name().to_owned();
        self.shared.remove(&name);
    }
}

impl Backend for DmPool {
    fn kind(&self) -> &'static str {
        "dm"
    }

    fn create(&self, dev: DeviceId, _size: Bytes) -> Result<()> {
        self.0.msg(&format!("create_thin {}", dev.get()))
    }

    fn snapshot(&self, origin: DeviceId, new: DeviceId) -> Result<()> {
        let s = &self.0;
        let active = s.is_active(origin)?;
        let oname = s.thin_name(origin)?;
        let id = DevId::Name(&oname);
        if active {
            // Suspend the origin (flushing it) around the metadata change.
            // The engine has frozen the filesystem already: skip dm's own freeze.
            s.dm.device_suspend(
                &id,
                DmOptions::default().set_flags(DmFlags::DM_SUSPEND | DmFlags::DM_SKIP_LOCKFS),
            )
            .map_err(|e| dmerr("suspend origin", e))?;
        }
        let r = s.msg(&format!("create_snap {} {}", new.get(), origin.get()));
        if active && let Err(e) = s.dm.device_suspend(&id, DmOptions::default()) {
            log::error!("resume of {oname:?} failed: {e}");
        }
        r
    }

    fn delete(&self, dev: DeviceId) -> Result<()> {
        let s = &self.0;
        if s.is_active(dev)? {
            s.remove(&s.thin_name(dev)?);
        }
        // dm-thin refuses to delete a device that is still open; a device
        // whose last mount (in another mount namespace, a container's) is
        // just going away is open for a moment more. Retry for up to 3 s
        // before the device is left to the next garbage collection.
        let mut tries = 0;
        loop {
            match s.msg(&format!("delete {}", dev.get())) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if !self.exists(dev)? {
                        return Ok(());
                    }
                    tries += 1;
                    if tries >= 30 {
                        return Err(e);
                    }
                    if tries == 1 {
                        log::debug!("delete of thin device {dev} failed ({e}); retrying");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    if s.is_active(dev)? {
                        s.remove(&s.thin_name(dev)?);
                    }
                }
            }
        }
    }

    fn exists(&self, dev: DeviceId) -> Result<bool> {
        if self.0.is_active(dev)? {
            return Ok(true);
        }
        Ok(self.probe(dev).is_ok())
    }

    fn list(&self) -> Result<Vec<DeviceId>> {
        // dm-thin cannot list its thin ids; every id is recorded in sled
        // before it is created (see the module doc).
        Ok(Vec::new())
    }

    fn activate(
        &self,
        dev: DeviceId,
        size: Bytes,
        read_only: bool,
    ) -> Result<Box<dyn ActiveDevice>> {
        let s = &self.0;
        let name = s.thin_name(dev)?;
        if s.is_active(dev)? {
            return Err(Error::Busy(format!("thin device {dev} is already active")));
        }
        let t = self.with_pool(|p| {
            ThinDev::setup(
                &s.dm,
                &name,
                None,
                Sectors(size.0 / 512),
                p,
                Self::thin_id(dev)?,
            )
            .map_err(|e| dmerr(format!("activate thin device {dev}"), e))
        })?;
        let path = t.devnode();
        // Wait for devtmpfs to show the node.
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let active = DmActive {
            shared: s.clone(),
            dev: Mutex::new(t),
            path,
        };
        // Dropped on error: the device is removed again.
        if read_only {
            adopt::set_read_only(&s.dm, &name)?;
        }
        Ok(Box::new(active))
    }

    fn live_attachment(&self, dev: DeviceId) -> Option<PathBuf> {
        // Active before this process started: kept at open because it is
        // mounted outside thinfs (see `adopt`).
        self.0.active_node(dev).ok()
    }

    fn open_read(&self, dev: DeviceId, size: Bytes) -> Result<crate::backend::DeviceReader> {
        use crate::backend::DeviceReader;
        let s = &self.0;
        // One activation per thin device: an active one (a mounted
        // snapshot; its bytes do not change under a read-only mount) is
        // read through its live node. A device being removed by another
        // thread (an unmount) may vanish between the two steps: try again.
        let mut last = None;
        for _ in 0..50 {
            if !s.is_active(dev)? {
                match self.activate(dev, size, true) {
                    Ok(a) => {
                        let f = std::fs::File::open(a.path())
                            .ctx(|| format!("open {}", a.path().display()))?;
                        return Ok(DeviceReader::new(f, Some(a)));
                    }
                    Err(e) if e.errno() == libc::EBUSY => last = Some(e),
                    Err(e) => return Err(e),
                }
            } else {
                match s.active_node(dev) {
                    Ok(path) => match std::fs::File::open(&path) {
                        Ok(f) => return Ok(DeviceReader::new(f, None)),
                        Err(e) => last = Some(Error::io(format!("open {}", path.display()), e)),
                    },
                    Err(e) => last = Some(e),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last.unwrap_or_else(|| Error::Busy(format!("thin device {dev} cannot be read"))))
    }

    fn resize(&self, _dev: DeviceId, _size: Bytes) -> Result<()> {
        // Thin devices have no size of their own: the table length is set
        // at activation (and refreshed on a live device).
        Ok(())
    }

    fn usage(&self, dev: DeviceId) -> Result<Usage> {
        let s = &self.0;
        let st = if s.is_active(dev)? {
            let n = s.thin_name(dev)?;
            let (_, status) =
                s.dm.table_status(&DevId::Name(&n), DmOptions::default())
                    .map_err(|e| dmerr("thin status", e))?;
            status
                .first()
                .map(|(_, _, _, line)| line.parse::<ThinStatus>())
                .transpose()
                .map_err(|e| dmerr("parse thin status", e))?
                .unwrap_or(ThinStatus::Error)
        } else {
            self.probe(dev)?
        };
        match st {
            ThinStatus::Working(w) => {
                let mapped = *w.nr_mapped_sectors * 512;
                Ok(Usage {
                    mapped,
                    // dm-thin does not say which blocks are shared.
                    exclusive: mapped,
                    extents: 0,
                })
            }
            _ => Err(Error::Faulty {
                name: format!("thin device {dev}"),
                reason: "dm reports it failed".into(),
            }),
        }
    }

    fn status(&self) -> Result<PoolStatus> {
        let s = &self.0;
        let st = self.with_pool(|p| {
            p.status(&s.dm, DmOptions::default())
                .map_err(|e| dmerr("pool status", e))
        })?;
        match st {
            ThinPoolStatus::Working(w) => {
                let bs = BLOCK_SECTORS * 512;
                let total = *w.usage.total_data * bs;
                let used = *w.usage.used_data * bs;
                Ok(PoolStatus {
                    backend: "dm".into(),
                    total,
                    used,
                    available: total - used,
                    detail: format!(
                        "{}; metadata {}/{} blocks used; {:?}{}",
                        s.detail,
                        *w.usage.used_meta,
                        *w.usage.total_meta,
                        w.summary,
                        if w.needs_check { "; NEEDS CHECK" } else { "" }
                    ),
                    // Metadata blocks are 4 KiB.
                    meta_used: Some(*w.usage.used_meta * 4096),
                    meta_total: Some(*w.usage.total_meta * 4096),
                })
            }
            other => Err(Error::Faulty {
                name: "dm pool".into(),
                reason: format!("{other:?}"),
            }),
        }
    }

    fn changed_ranges(
        &self,
        base: Option<DeviceId>,
        snap: DeviceId,
        size: Bytes,
    ) -> Result<Vec<ChangedRange>> {
        self.0.meta_snap.changed(
            &|m| self.0.msg(m),
            || self.with_pool(|p| Ok(p.meta_dev().devnode())),
            || compare_by_reading(self, base, snap, size),
            base,
            snap,
            size.0,
        )
    }

    fn trim(&self) -> Result<()> {
        Ok(())
    }

    fn transaction_id(&self) -> Result<Option<u64>> {
        let s = &self.0;
        match self.with_pool(|p| {
            p.status(&s.dm, DmOptions::default())
                .map_err(|e| dmerr("pool status", e))
        })? {
            ThinPoolStatus::Working(w) => Ok(Some(w.transaction_id)),
            other => Err(Error::Faulty {
                name: "dm pool".into(),
                reason: format!("{other:?}"),
            }),
        }
    }

    fn set_transaction_id(&self, id: u64) -> Result<()> {
        if let Some(cur) = self.transaction_id()?
            && cur != id
        {
            self.0.msg(&format!("set_transaction_id {cur} {id}"))?;
        }
        Ok(())
    }
}
