//! The block backend: where thin devices come from.
//!
//! A backend creates, snapshots, deletes and attaches thin devices, each
//! named by a 24-bit [`DeviceId`]. It knows nothing of names, the graph or
//! filesystems: the engine owns those. Implementations: [`reflink`] (the
//! embedded default: sparse image files on a reflink-capable XFS, attached
//! through loop devices) and [`dm`] (Linux dm-thin).

mod compare;
pub mod dm;
pub mod reflink;

pub use compare::{ChangedRange, RangeKind, compare_by_reading, normalize};

use crate::error::Result;
use crate::types::{Bytes, DeviceId};
use std::path::Path;

/// An attached device: a block device path valid while this lives.
pub trait ActiveDevice: Send + Sync + std::fmt::Debug {
    /// The block device node.
    fn path(&self) -> &Path;
    /// Make the live device `size` bytes long after a resize.
    fn refresh_capacity(&self, size: Bytes) -> Result<()>;
    /// A filesystem is now mounted on it: handles needed only to set it up
    /// may be let go (saves a file descriptor per mounted device).
    fn mounted(&self) {}
}

/// A device opened for reading by [`Backend::open_read`]. The file is
/// closed before the activation it may hold is let go (fields drop in
/// order): a block device still open cannot be removed.
#[derive(Debug)]
pub struct DeviceReader {
    /// The block device, read-only.
    pub file: std::fs::File,
    _active: Option<Box<dyn ActiveDevice>>,
}

impl DeviceReader {
    /// `file`, kept readable by `active` (None: a live device of someone
    /// else's).
    pub fn new(file: std::fs::File, active: Option<Box<dyn ActiveDevice>>) -> DeviceReader {
        DeviceReader {
            file,
            _active: active,
        }
    }
}

/// Space used by one device.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Bytes mapped (allocated) in the device.
    pub mapped: u64,
    /// Bytes mapped and shared with no other device.
    pub exclusive: u64,
    /// Number of extents (reflink) or mappings.
    pub extents: u64,
}

/// Pool-wide status.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PoolStatus {
    /// Backend kind.
    pub backend: String,
    /// Bytes of data space.
    pub total: u64,
    /// Bytes used.
    pub used: u64,
    /// Bytes free for new data.
    pub available: u64,
    /// How the pool is laid out, for humans.
    pub detail: String,
    /// Metadata bytes used (dm-thin).
    #[serde(default)]
    pub meta_used: Option<u64>,
    /// Metadata bytes in all (dm-thin).
    #[serde(default)]
    pub meta_total: Option<u64>,
}

/// A pool of thin devices.
pub trait Backend: Send + Sync {
    /// `reflink`, `dm`, `fake`.
    fn kind(&self) -> &'static str;
    /// Create an empty device of virtual size `size`. Fails if it exists.
    fn create(&self, dev: DeviceId, size: Bytes) -> Result<()>;
    /// Make `new` a point-in-time copy of `origin` sharing its blocks. The
    /// caller keeps `origin`'s filesystem frozen across the call.
    fn snapshot(&self, origin: DeviceId, new: DeviceId) -> Result<()>;
    /// Before [`Backend::snapshot`] of a device being written: do what can
    /// be done of the copy without freezing it; `snapshot` then finishes
    /// it. On error the caller deletes `new`. Default: nothing.
    fn prepare_snapshot(&self, _origin: DeviceId, _new: DeviceId) -> Result<()> {
        Ok(())
    }
    /// Delete a device and free its blocks. Deleting a missing device is Ok.
    fn delete(&self, dev: DeviceId) -> Result<()>;
    /// Does the device exist?
    fn exists(&self, dev: DeviceId) -> Result<bool>;
    /// All devices in the pool.
    fn list(&self) -> Result<Vec<DeviceId>>;
    /// Attach the device as a block device of `size` bytes.
    fn activate(
        &self,
        dev: DeviceId,
        size: Bytes,
        read_only: bool,
    ) -> Result<Box<dyn ActiveDevice>>;
    /// Grow the device to `size`.
    fn resize(&self, dev: DeviceId, size: Bytes) -> Result<()>;
    /// Space used by the device.
    fn usage(&self, dev: DeviceId) -> Result<Usage>;
    /// Pool status.
    fn status(&self) -> Result<PoolStatus>;
    /// Bytes of pool space backing the device now, shared blocks included.
    /// Cheap (called many times a second by the space guard).
    fn allocated(&self, dev: DeviceId) -> Result<u64> {
        self.usage(dev).map(|u| u.mapped)
    }
    /// The logical ranges of `snap` (a device of `size` bytes) that differ
    /// from `base`, in increasing order: `Data` where `snap` holds bytes
    /// to send, `Zero` where it reads as zeros and `base` did not. With no
    /// base: every range that may hold data (holes omitted). The default
    /// reads both devices whole: correct, but proportional to the device.
    fn changed_ranges(
        &self,
        base: Option<DeviceId>,
        snap: DeviceId,
        size: Bytes,
    ) -> Result<Vec<ChangedRange>> {
        compare_by_reading(self, base, snap, size)
    }

    /// Open `dev`'s bytes for reading: a new read-only activation, kept
    /// alive by the returned guard. A backend that allows one activation
    /// per device (dm-thin) reads an active device (a mounted snapshot)
    /// through its live block device instead.
    fn open_read(&self, dev: DeviceId, size: Bytes) -> Result<DeviceReader> {
        use crate::error::IoContext;
        let a = self.activate(dev, size, true)?;
        let f = std::fs::File::open(a.path()).ctx(|| format!("open {}", a.path().display()))?;
        Ok(DeviceReader::new(f, Some(a)))
    }

    /// A block device of `dev` attached before this process started and
    /// still alive (a mount made outside thinfs holds it after a crash of
    /// the daemon), to be used again instead of attaching a second one.
    fn live_attachment(&self, _dev: DeviceId) -> Option<std::path::PathBuf> {
        None
    }
    /// Return freed space to the layer below (best effort).
    fn trim(&self) -> Result<()>;
    /// The backend's own transaction id, if it keeps one (dm-thin).
    fn transaction_id(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Bring the backend's transaction id to `id` (the metadata's).
    fn set_transaction_id(&self, _id: u64) -> Result<()> {
        Ok(())
    }
}

/// A daemon killed while an image's filesystem was frozen for a snapshot
/// leaves that filesystem frozen, and so alive, with the block device under
/// it. Reach the superblock again by mounting the same block device, thaw
/// it, and let it go. Harmless on a device whose filesystem is not frozen.
pub(crate) fn thaw_leftover(dev: &Path) {
    use crate::sys::{fsio, mount};
    let m = mount::fsmount_detached("ext4", dev, false, &[], &[])
        .or_else(|_| mount::fsmount_detached("ext4", dev, true, &[], &[]));
    match m {
        Ok(fd) => match fsio::thaw(&fd) {
            Ok(()) => log::warn!(
                "recovery: thawed a filesystem left frozen by a crash on {}",
                dev.display()
            ),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => log::error!("recovery: cannot thaw {}: {e}", dev.display()),
        },
        Err(e) => log::debug!("recovery: no filesystem to thaw on {}: {e}", dev.display()),
    }
}
