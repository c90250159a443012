//! Inodes of the FUSE tree: virtual ones (root, `.thinfs`, `.snapshots`)
//! and real ones (an O_PATH handle on a file of an inner filesystem).
//!
//! Inode numbers are computed, not allocated: a real inode is
//! `(record id << 40) | inner inode number`, so it is unique across all
//! images and snapshots and the same for the whole life of the mount
//! (ext4 inode numbers are 32-bit). Virtual inodes use record id 0, and
//! `.snapshots` of an image uses the one inner number ext4 never gives.

use crate::engine::Mounted;
use crate::error::{Error, Result};
use crate::types::DeviceId;
use fuser::BackingId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The FUSE root.
pub const ROOT_INO: u64 = 1;
/// `/.thinfs`.
pub const CONTROL_INO: u64 = 2;
const INNER_BITS: u32 = 40;
const SNAPDIR_LOW: u64 = (1 << INNER_BITS) - 1;

/// `/.thinfs/info`: one JSON file per image and snapshot.
pub const INFO_INO: u64 = 6;

/// Files in `.thinfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlFile {
    /// `.thinfs/info/NAME[@SNAP]`: one device, JSON.
    Info(DeviceId),
    /// Pool status, JSON.
    PoolJson,
    /// Every device with usage, JSON.
    DevicesJson,
    /// The graph as an indented tree.
    Tree,
}

impl ControlFile {
    /// All of them, with their names and inode numbers.
    pub const ALL: [(ControlFile, &'static str, u64); 3] = [
        (ControlFile::PoolJson, "pool.json", 3),
        (ControlFile::DevicesJson, "devices.json", 4),
        (ControlFile::Tree, "tree", 5),
    ];
}

/// What an inode is.
#[derive(Debug)]
pub enum Node {
    /// The mount's root.
    Root,
    /// `.thinfs`.
    Control,
    /// A file in `.thinfs`.
    ControlFile(ControlFile),
    /// `IMAGE/.snapshots`.
    SnapDir(DeviceId),
    /// `.thinfs/info`.
    InfoDir,
    /// A file or directory inside an image or snapshot.
    Real(Real),
}

/// A file of an inner filesystem.
#[derive(Debug)]
pub struct Real {
    /// Record id of the image or snapshot it belongs to.
    pub dev: DeviceId,
    /// O_PATH handle.
    pub fd: OwnedFd,
    /// Keeps the inner mount alive while the inode lives.
    pub mount: Arc<Mounted>,
    /// The root directory of the image or snapshot.
    pub is_root: bool,
    /// `S_IFMT` bits.
    pub fmt: u32,
}

impl Real {
    /// The O_PATH handle.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One inode with its kernel lookup count.
#[derive(Debug)]
pub struct Inode {
    /// Its number.
    pub ino: u64,
    /// The passthrough backing id shared by every open handle of the inode.
    /// Declared before `node`: the kernel's reference to the backing file
    /// goes before the mount it is on.
    pub backing: Mutex<Option<Arc<BackingId>>>,
    /// What it is.
    pub node: Node,
    lookups: AtomicU64,
}

/// Inode number of a real file.
pub fn real_ino(dev: DeviceId, inner: u64) -> u64 {
    ((dev.get() as u64) << INNER_BITS) | (inner & SNAPDIR_LOW)
}

/// Inode number of `.thinfs/info/NAME`.
pub fn info_ino(dev: DeviceId) -> u64 {
    ((dev.get() as u64) << INNER_BITS) | (SNAPDIR_LOW - 1)
}

/// Inode number of `IMAGE/.snapshots`.
pub fn snapdir_ino(image: DeviceId) -> u64 {
    ((image.get() as u64) << INNER_BITS) | SNAPDIR_LOW
}

/// The inode table.
#[derive(Debug, Default)]
pub struct InodeTable {
    map: Mutex<HashMap<u64, Arc<Inode>>>,
}

impl InodeTable {
    /// A table holding the static virtual inodes.
    pub fn new() -> InodeTable {
        let t = InodeTable::default();
        t.insert_static(ROOT_INO, Node::Root);
        t.insert_static(CONTROL_INO, Node::Control);
        t.insert_static(INFO_INO, Node::InfoDir);
        for (f, _, ino) in ControlFile::ALL {
            t.insert_static(ino, Node::ControlFile(f));
        }
        t
    }

    fn insert_static(&self, ino: u64, node: Node) {
        self.map.lock().insert(
            ino,
            Arc::new(Inode {
                ino,
                node,
                lookups: AtomicU64::new(1 << 60),
                backing: Mutex::new(None),
            }),
        );
    }

    /// The inode `ino`.
    pub fn get(&self, ino: u64) -> Result<Arc<Inode>> {
        self.map.lock().get(&ino).cloned().ok_or_else(|| {
            Error::io(
                format!("inode {ino:#x}"),
                std::io::Error::from_raw_os_error(libc::ESTALE),
            )
        })
    }

    /// Record one kernel lookup of inode `ino`, creating it with `make` if
    /// it is not known. Returns the inode kept in the table.
    ///
    /// A real inode whose mount is being taken offline is refused (ESTALE):
    /// the check and the insert happen under the table's lock, and the
    /// offline operation sets `closing` before it purges under the same
    /// lock, so no inode of that mount can slip in after the purge.
    pub fn remember(&self, ino: u64, make: impl FnOnce() -> Node) -> Result<Arc<Inode>> {
        let mut m = self.map.lock();
        let i = match m.get(&ino) {
            Some(i) => i.clone(),
            None => {
                let i = Arc::new(Inode {
                    ino,
                    node: make(),
                    lookups: AtomicU64::new(0),
                    backing: Mutex::new(None),
                });
                m.insert(ino, i.clone());
                i
            }
        };
        if let Node::Real(r) = &i.node
            && r.mount.closing()
        {
            if i.lookups.load(Ordering::Relaxed) == 0 {
                m.remove(&ino);
            }
            return Err(Error::io(
                format!("inode {ino:#x}: its image or snapshot is being changed"),
                std::io::Error::from_raw_os_error(libc::ESTALE),
            ));
        }
        i.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(i)
    }

    /// Is `ino` known?
    pub fn peek(&self, ino: u64) -> Option<Arc<Inode>> {
        self.map.lock().get(&ino).cloned()
    }

    /// The kernel forgot `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut m = self.map.lock();
        if let Some(i) = m.get(&ino) {
            let prev = i
                .lookups
                .fetch_sub(n.min(i.lookups.load(Ordering::Relaxed)), Ordering::Relaxed);
            if prev <= n {
                m.remove(&ino);
            }
        }
    }

    /// Drop every inode of a destroyed device (and its `.snapshots`): the
    /// kernel's later requests for them get ESTALE, and a new device that
    /// reuses the id starts with fresh inodes.
    pub fn purge_dev(&self, dev: DeviceId) -> usize {
        let mut m = self.map.lock();
        let before = m.len();
        m.retain(|_, i| match &i.node {
            Node::Real(r) => r.dev != dev,
            Node::SnapDir(d) => *d != dev,
            Node::ControlFile(ControlFile::Info(d)) => *d != dev,
            _ => true,
        });
        before - m.len()
    }

    /// Number of inodes held.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }
}
