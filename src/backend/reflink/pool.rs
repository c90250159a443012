//! The reflink pool: open/create, device files, loop attachment.

use super::twophase;
use crate::backend::{ActiveDevice, Backend, PoolStatus, Usage};
use crate::error::{Error, IoContext, Result};
use crate::sys::fsio::Extent;
use crate::sys::tools::Tool;
use crate::sys::{self, file, fsio, loopdev::LoopDevice, mount};
use crate::types::{Bytes, DeviceId};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The pool file's name in the state directory.
pub const POOL_FILE: &str = "pool.img";

/// An open reflink pool.
pub struct ReflinkPool {
    /// Directory holding device image files (on the pool filesystem).
    devices: File,
    /// The detached XFS mount, when the pool is a file (kept alive here).
    _pool_mount: Option<OwnedFd>,
    /// The loop device under the pool filesystem (kept open while the pool is).
    _pool_loop: Option<LoopDevice>,
    detail: String,
    /// Snapshots copied before the freeze, waiting for `snapshot` to
    /// catch up: the extents of their files after the copy.
    prepared: parking_lot::Mutex<HashMap<DeviceId, Vec<Extent>>>,
}

impl std::fmt::Debug for ReflinkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReflinkPool({})", self.detail)
    }
}

fn dev_name(dev: DeviceId) -> String {
    format!("{:08}.img", dev.get())
}

/// Can files in `dir` be reflinked? (probe with two temporary files)
fn supports_reflink(dir: &Path) -> bool {
    let a = dir.join(".reflink-probe-a");
    let b = dir.join(".reflink-probe-b");
    let ok = (|| -> std::io::Result<()> {
        let fa = File::create(&a)?;
        fa.write_all_at(&[7u8; 4096], 0)?;
        let fb = File::create(&b)?;
        fsio::ficlone(&fb, &fa)
    })()
    .is_ok();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

/// Wait until no loop device is backed by `file` any more (a killed daemon's
/// autoclear loop devices go away asynchronously), or until the only
/// devices left on it are mounted in the mount table: those are held by
/// someone else (containerd mounts its snapshots' block devices itself),
/// and keep the old pool filesystem alive. Its loop device is returned
/// then, to be mounted again: mounting the same block device reaches the
/// same live superblock, so the pool never has two.
fn wait_loops_gone(file: &Path) -> Result<Option<PathBuf>> {
    let want = file.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = sys::loopdev::attached();
        let pools: Vec<_> = all.iter().filter(|l| l.backing_file == want).collect();
        let Some(pool) = pools.first() else {
            return Ok(None);
        };
        if pools.len() == 1 {
            let inner: Vec<_> = all
                .iter()
                .filter(|l| l.backing_dev == pool.own_dev)
                .collect();
            let table = mount::mount_table().unwrap_or_default();
            let outside = |l: &&sys::loopdev::LoopStatus| {
                let src = l.path.to_string_lossy();
                table.iter().any(|m| m.source == src)
            };
            if !inner.is_empty() && inner.iter().all(outside) {
                log::warn!(
                    "the pool on {} is still held by {} device(s) mounted outside thinfs (containerd's); using it again",
                    pool.path.display(),
                    inner.len()
                );
                return Ok(Some(pool.path.clone()));
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Busy(format!(
                "pool file {want} is still attached to {:?}: is another thinfs running on this state directory?",
                pools.iter().map(|l| &l.path).collect::<Vec<_>>()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon killed while an image's filesystem was frozen for a snapshot
/// leaves that filesystem frozen: a frozen superblock stays alive, and with
/// it its loop device and the pool under it. Find such devices (loop devices
/// whose backing file lives on the old pool's loop device), reach their
/// superblock again by mounting the same block device, and thaw it; then
/// everything goes away as after any other exit.
fn thaw_leftovers(pool_file: &Path) {
    let want = pool_file.to_string_lossy().into_owned();
    let all = sys::loopdev::attached();
    for pool_loop in all.iter().filter(|l| l.backing_file == want) {
        for inner in all.iter().filter(|l| l.backing_dev == pool_loop.own_dev) {
            crate::backend::thaw_leftover(&inner.path);
        }
    }
}

impl ReflinkPool {
    /// Open the pool in `state`, creating it (of `size` bytes) if it does not
    /// exist. An existing pool is re-attached, never re-created.
    pub fn open(state: &Path, size: Bytes) -> Result<ReflinkPool> {
        let pool_file = state.join(POOL_FILE);
        let direct_dir = state.join("devices");
        if !pool_file.exists() && (direct_dir.exists() || supports_reflink(state)) {
            std::fs::create_dir_all(&direct_dir)
                .ctx(|| format!("create {}", direct_dir.display()))?;
            let devices =
                File::open(&direct_dir).ctx(|| format!("open {}", direct_dir.display()))?;
            return Ok(ReflinkPool {
                devices,
                _pool_mount: None,
                _pool_loop: None,
                prepared: Default::default(),
                detail: format!(
                    "device files in {} (reflink-capable host filesystem)",
                    direct_dir.display()
                ),
            });
        }
        let fresh = !pool_file.exists();
        if fresh {
            if size.0 < 512 << 20 {
                return Err(Error::InvalidSize {
                    input: size.human(),
                    why: "the pool must be at least 512M",
                });
            }
            let tmp = state.join("pool.img.new");
            let f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            f.set_len(size.0)
                .ctx(|| format!("size {}", tmp.display()))?;
            drop(f);
            Tool::MkfsXfs.run(
                "format the pool",
                [
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "-m".as_ref(),
                    "reflink=1".as_ref(),
                    "-s".as_ref(),
                    "size=4096".as_ref(),
                    "-L".as_ref(),
                    "thinfs-pool".as_ref(),
                    tmp.as_os_str(),
                ] as [&OsStr; 9],
            )?;
            std::fs::rename(&tmp, &pool_file).ctx(|| format!("rename {}", tmp.display()))?;
        }
        let live = if fresh {
            None
        } else {
            thaw_leftovers(&pool_file);
            wait_loops_gone(&pool_file)?
        };
        let lo = match live {
            Some(path) => LoopDevice::open_existing(&path)
                .ctx(|| format!("open the pool's loop device {}", path.display()))?,
            None => {
                let backing = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&pool_file)
                    .ctx(|| format!("open {}", pool_file.display()))?;
                LoopDevice::attach(&backing, false, "thinfs-pool")
                    .ctx(|| format!("attach {} to a loop device", pool_file.display()))?
            }
        };
        let mnt = mount::fsmount_detached("xfs", lo.path(), false, &["nouuid"], &[])
            .ctx(|| format!("mount the pool filesystem on {}", lo.path().display()))?;
        if fresh {
            file::mkdirat(mnt.as_fd(), OsStr::new("devices"), 0o700)
                .ctx(|| "create devices directory".into())?;
        }
        let devices = File::from(
            file::openat(
                mnt.as_fd(),
                OsStr::new("devices"),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .ctx(|| "open the pool's devices directory".into())?,
        );
        Ok(ReflinkPool {
            devices,
            detail: format!(
                "XFS (reflink) in {} on {}",
                pool_file.display(),
                lo.path().display()
            ),
            _pool_mount: Some(mnt),
            _pool_loop: Some(lo),
            prepared: Default::default(),
        })
    }

    fn open_dev(&self, dev: DeviceId, flags: i32, mode: u32) -> std::io::Result<File> {
        file::openat(
            self.devices.as_fd(),
            OsStr::new(&dev_name(dev)),
            flags,
            mode,
        )
        .map(File::from)
    }

    /// Create the image file of a new device; it must not exist.
    fn create_dev_file(&self, dev: DeviceId) -> Result<File> {
        self.open_dev(dev, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST) => Error::AlreadyExists(format!("backend device {dev}")),
                _ => Error::io(format!("create device file {}", dev_name(dev)), e),
            })
    }

    fn sync_dir(&self) -> Result<()> {
        self.devices
            .sync_all()
            .ctx(|| "sync the devices directory".into())
    }
}

/// An attached loop device. Its descriptor is dropped once a filesystem is
/// mounted on it (the mount keeps the autoclear device alive) and reopened
/// by path if needed again.
#[derive(Debug)]
struct LoopActive {
    path: std::path::PathBuf,
    dev: parking_lot::Mutex<Option<LoopDevice>>,
}

impl ActiveDevice for LoopActive {
    fn path(&self) -> &Path {
        &self.path
    }

    fn mounted(&self) {
        self.dev.lock().take();
    }
    fn refresh_capacity(&self, _size: Bytes) -> Result<()> {
        let mut g = self.dev.lock();
        if g.is_none() {
            *g = Some(
                LoopDevice::open_existing(&self.path)
                    .ctx(|| format!("open {}", self.path.display()))?,
            );
        }
        match g.as_ref() {
            Some(d) => d
                .refresh_capacity()
                .ctx(|| format!("refresh size of {}", self.path.display())),
            None => Ok(()),
        }
    }
}

impl Backend for ReflinkPool {
    fn kind(&self) -> &'static str {
        "reflink"
    }

    fn create(&self, dev: DeviceId, size: Bytes) -> Result<()> {
        let f = self
            .open_dev(dev, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST) => Error::AlreadyExists(format!("backend device {dev}")),
                _ => Error::io(format!("create device file {}", dev_name(dev)), e),
            })?;
        f.set_len(size.0).ctx(|| format!("size device {dev}"))?;
        f.sync_all().ctx(|| format!("sync device {dev}"))?;
        self.sync_dir()
    }

    fn snapshot(&self, origin: DeviceId, new: DeviceId) -> Result<()> {
        let src = self
            .open_dev(origin, libc::O_RDONLY, 0)
            .ctx(|| format!("open origin device {origin}"))?;
        let prepared = self.prepared.lock().remove(&new);
        if let Some(ext) = prepared {
            let dst = self
                .open_dev(new, libc::O_RDWR, 0)
                .ctx(|| format!("open prepared device {new}"))?;
            let n = twophase::catch_up(&src, &dst, &ext, new)?;
            log::info!(
                "snapshot device {new} of {origin}: copied before the freeze, {n} range(s) caught up frozen"
            );
            dst.sync_all().ctx(|| format!("sync device {new}"))?;
            return self.sync_dir();
        }
        let dst = self.create_dev_file(new)?;
        fsio::ficlone(&dst, &src).ctx(|| format!("reflink device {origin} to {new}"))?;
        let len = src
            .metadata()
            .ctx(|| format!("stat device {origin}"))?
            .len();
        dst.set_len(len).ctx(|| format!("size device {new}"))?;
        dst.sync_all().ctx(|| format!("sync device {new}"))?;
        self.sync_dir()
    }

    fn prepare_snapshot(&self, origin: DeviceId, new: DeviceId) -> Result<()> {
        let src = self
            .open_dev(origin, libc::O_RDONLY, 0)
            .ctx(|| format!("open origin device {origin}"))?;
        let create = |len: u64| -> Result<File> {
            let f = self.create_dev_file(new)?;
            f.set_len(len).ctx(|| format!("size device {new}"))?;
            Ok(f)
        };
        if let Some(ext) = twophase::prepare(&src, create, new)? {
            self.prepared.lock().insert(new, ext);
        }
        Ok(())
    }

    fn delete(&self, dev: DeviceId) -> Result<()> {
        self.prepared.lock().remove(&dev);
        match file::unlinkat(self.devices.as_fd(), OsStr::new(&dev_name(dev)), false) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(Error::io(format!("delete device {dev}"), e)),
        }
    }

    fn exists(&self, dev: DeviceId) -> Result<bool> {
        match file::open_path(self.devices.as_fd(), OsStr::new(&dev_name(dev))) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(Error::io(format!("look up device {dev}"), e)),
        }
    }

    fn list(&self) -> Result<Vec<DeviceId>> {
        let dir = file::reopen(self.devices.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
            .ctx(|| "open devices directory".into())?;
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            let ents = file::read_dir_at(&dir, off).ctx(|| "read devices directory".into())?;
            if ents.is_empty() {
                break;
            }
            for e in &ents {
                off = e.off;
                let n = e.name.to_string_lossy();
                if let Some(num) = n.strip_suffix(".img")
                    && let Ok(v) = num.parse::<u32>()
                {
                    out.push(DeviceId::new(v)?);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn activate(
        &self,
        dev: DeviceId,
        _size: Bytes,
        read_only: bool,
    ) -> Result<Box<dyn ActiveDevice>> {
        let flags = if read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        let f = self
            .open_dev(dev, flags | libc::O_DIRECT, 0)
            .or_else(|_| self.open_dev(dev, flags, 0))
            .ctx(|| format!("open device {dev}"))?;
        let lo = LoopDevice::attach(&f, read_only, &format!("thinfs-{}", dev.get()))
            .ctx(|| format!("attach device {dev} to a loop device"))?;
        Ok(Box::new(LoopActive {
            path: lo.path().to_path_buf(),
            dev: parking_lot::Mutex::new(Some(lo)),
        }))
    }

    fn resize(&self, dev: DeviceId, size: Bytes) -> Result<()> {
        let f = self
            .open_dev(dev, libc::O_RDWR, 0)
            .ctx(|| format!("open device {dev}"))?;
        let cur = f.metadata().ctx(|| format!("stat device {dev}"))?.len();
        if size.0 < cur {
            return Err(Error::InvalidSize {
                input: size.human(),
                why: "shrinking a device is not supported",
            });
        }
        f.set_len(size.0).ctx(|| format!("resize device {dev}"))?;
        f.sync_all().ctx(|| format!("sync device {dev}"))
    }

    fn live_attachment(&self, dev: DeviceId) -> Option<PathBuf> {
        let pool = self._pool_loop.as_ref()?;
        let all = sys::loopdev::attached();
        let own = all.iter().find(|l| l.path == pool.path())?.own_dev;
        let name = format!("/{}", dev_name(dev));
        all.iter()
            .find(|l| l.backing_dev == own && l.backing_file.ends_with(&name))
            .map(|l| l.path.clone())
    }

    fn usage(&self, dev: DeviceId) -> Result<Usage> {
        let f = self
            .open_dev(dev, libc::O_RDONLY, 0)
            .ctx(|| format!("open device {dev}"))?;
        let (mapped, exclusive, extents) =
            fsio::fiemap_usage(&f).ctx(|| format!("map extents of device {dev}"))?;
        Ok(Usage {
            mapped,
            exclusive,
            extents,
        })
    }

    fn allocated(&self, dev: DeviceId) -> Result<u64> {
        let f = file::open_path(self.devices.as_fd(), OsStr::new(&dev_name(dev)))
            .ctx(|| format!("look up device {dev}"))?;
        let st = file::fstat(f.as_fd()).ctx(|| format!("stat device {dev}"))?;
        Ok(st.st_blocks as u64 * 512)
    }

    fn status(&self) -> Result<PoolStatus> {
        let s = fsio::statvfs(&self.devices).ctx(|| "statfs the pool".into())?;
        let bs = s.f_frsize;
        Ok(PoolStatus {
            backend: "reflink".into(),
            total: s.f_blocks * bs,
            used: (s.f_blocks - s.f_bfree) * bs,
            available: s.f_bavail * bs,
            detail: self.detail.clone(),
            meta_used: None,
            meta_total: None,
        })
    }

    fn changed_ranges(
        &self,
        base: Option<DeviceId>,
        snap: DeviceId,
        size: Bytes,
    ) -> Result<Vec<crate::backend::ChangedRange>> {
        super::ranges::changed(|d| self.open_dev(d, libc::O_RDONLY, 0), base, snap, size)
    }

    fn trim(&self) -> Result<()> {
        if self._pool_mount.is_some() {
            fsio::fitrim(&self.devices).ctx(|| "trim the pool".into())?;
        }
        Ok(())
    }
}
