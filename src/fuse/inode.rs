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
use crate::sys::handle::FileHandle;
use crate::types::DeviceId;
use fuser::BackingId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The FUSE root.
pub const ROOT_INO: u64 = 1;
/// `/.thinfs`.
pub const CONTROL_INO: u64 = 2;
const INNER_BITS: u32 = 40;
const SNAPDIR_LOW: u64 = (1 << INNER_BITS) - 1;

/// `/.thinfs/info`: one JSON file per image and snapshot.
pub const INFO_INO: u64 = 6;

/// Files in `.thinfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// A real inode whose descriptor was closed to stay within the budget;
    /// [`InodeTable::get`] reopens it from its handle before anyone uses it.
    Evicted(Evicted),
}

/// What is kept of a real inode without a descriptor.
#[derive(Debug)]
pub struct Evicted {
    dev: DeviceId,
    handle: FileHandle,
    mount: Arc<Mounted>,
    fmt: u32,
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
    /// Clock tick of its last use (eviction picks the oldest).
    used: AtomicU64,
    /// The passthrough backing id shared by every open handle of the inode.
    /// The handles own it; the inode only finds it, so it is closed when the
    /// last handle goes, however RELEASE and a late reply interleave.
    pub backing: Mutex<std::sync::Weak<BackingId>>,
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

/// The inode table. Every real inode holds an O_PATH descriptor until the
/// number of them passes a budget (a share of RLIMIT_NOFILE); then the
/// least recently used ones that no request holds are closed and kept as
/// file handles, reopened on their next use. So the kernel may cache any
/// number of inodes without running the daemon out of descriptors.
#[derive(Debug)]
pub struct InodeTable {
    map: Mutex<HashMap<u64, Arc<Inode>>>,
    /// Real inodes holding a descriptor.
    fds: AtomicUsize,
    budget: usize,
    clock: AtomicU64,
}

impl Default for InodeTable {
    fn default() -> Self {
        InodeTable::new()
    }
}

fn estale(what: String) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(libc::ESTALE))
}

impl InodeTable {
    /// A table holding the static virtual inodes, with a descriptor budget
    /// of half the open-file limit (at least 64).
    pub fn new() -> InodeTable {
        let budget = (crate::sys::handle::nofile_limit() / 2).clamp(64, 1 << 20) as usize;
        Self::with_budget(budget)
    }

    /// A table that keeps at most about `budget` descriptors.
    pub fn with_budget(budget: usize) -> InodeTable {
        let t = InodeTable {
            map: Mutex::new(HashMap::new()),
            fds: AtomicUsize::new(0),
            budget: budget.max(8),
            clock: AtomicU64::new(0),
        };
        t.insert_static(ROOT_INO, Node::Root);
        t.insert_static(CONTROL_INO, Node::Control);
        t.insert_static(INFO_INO, Node::InfoDir);
        for (f, _, ino) in ControlFile::ALL {
            t.insert_static(ino, Node::ControlFile(f));
        }
        t
    }

    fn new_inode(&self, ino: u64, node: Node, lookups: u64) -> Arc<Inode> {
        if matches!(node, Node::Real(_)) {
            self.fds.fetch_add(1, Ordering::Relaxed);
        }
        Arc::new(Inode {
            ino,
            used: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
            backing: Mutex::new(std::sync::Weak::new()),
            node,
            lookups: AtomicU64::new(lookups),
        })
    }

    fn insert_static(&self, ino: u64, node: Node) {
        let i = self.new_inode(ino, node, 1 << 60);
        self.map.lock().insert(ino, i);
    }

    /// An inode leaves the table: count its descriptor out.
    fn dropped(&self, i: &Inode) {
        if matches!(i.node, Node::Real(_)) {
            self.fds.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The inode `ino` (reopened from its handle if it was evicted).
    pub fn get(&self, ino: u64) -> Result<Arc<Inode>> {
        let mut m = self.map.lock();
        self.use_known(&mut m, ino)?
            .ok_or_else(|| estale(format!("inode {ino:#x}")))
    }

    /// Use inode `ino` if the table knows it: reopen it if it was evicted
    /// (then evict others if that passed the budget), note the use.
    fn use_known(&self, m: &mut HashMap<u64, Arc<Inode>>, ino: u64) -> Result<Option<Arc<Inode>>> {
        let Some(slot) = m.get_mut(&ino) else {
            return Ok(None);
        };
        let restored = matches!(slot.node, Node::Evicted(_));
        if restored {
            self.restore(slot)?;
        }
        slot.used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let out = slot.clone();
        if restored && self.fds.load(Ordering::Relaxed) > self.budget {
            self.evict(m);
        }
        Ok(Some(out))
    }

    /// Reopen an evicted inode in place (under the table's lock).
    fn restore(&self, slot: &mut Arc<Inode>) -> Result<()> {
        let ino = slot.ino;
        // Only the table holds an evicted inode, except for a moment when
        // `peek` lends it out: wait that moment out.
        let mut tries = 0;
        while Arc::get_mut(slot).is_none() {
            tries += 1;
            if tries > 1000 {
                return Err(estale(format!("inode {ino:#x} is busy being reopened")));
            }
            std::thread::yield_now();
        }
        let Some(inode) = Arc::get_mut(slot) else {
            return Err(estale(format!("inode {ino:#x}")));
        };
        let Node::Evicted(e) = std::mem::replace(&mut inode.node, Node::Root) else {
            return Ok(());
        };
        match e.handle.open_path(e.mount.root()) {
            Ok(fd) => {
                inode.node = Node::Real(Real {
                    dev: e.dev,
                    fd,
                    mount: e.mount,
                    is_root: false,
                    fmt: e.fmt,
                });
                self.fds.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(err) => {
                inode.node = Node::Evicted(e);
                Err(Error::io(format!("reopen inode {ino:#x}"), err))
            }
        }
    }

    /// Close the descriptors of the least recently used real inodes that no
    /// request holds, down to three quarters of the budget.
    fn evict(&self, m: &mut HashMap<u64, Arc<Inode>>) {
        let mut cands: Vec<(u64, u64)> = m
            .values()
            .filter(|i| {
                // An open file does not pin its inode's descriptor: its
                // handle reopens the inode (from its file handle if need
                // be) when a request needs the file, and the passthrough
                // registration lives in the inode, which stays.
                Arc::strong_count(i) == 1 && matches!(&i.node, Node::Real(r) if !r.is_root)
            })
            .map(|i| (i.used.load(Ordering::Relaxed), i.ino))
            .collect();
        cands.sort_unstable();
        let target = self.budget * 3 / 4;
        let mut closed = 0;
        for (_, ino) in cands {
            if self.fds.load(Ordering::Relaxed) <= target {
                break;
            }
            let Some(inode) = m.get_mut(&ino).and_then(Arc::get_mut) else {
                continue;
            };
            let Node::Real(r) = &inode.node else {
                continue;
            };
            let Ok(handle) = FileHandle::of(r.fd()) else {
                continue;
            };
            let Node::Real(r) = std::mem::replace(&mut inode.node, Node::Root) else {
                continue;
            };
            let Real {
                dev,
                fd,
                mount,
                fmt,
                ..
            } = r;
            drop(fd);
            inode.node = Node::Evicted(Evicted {
                dev,
                handle,
                mount,
                fmt,
            });
            self.fds.fetch_sub(1, Ordering::Relaxed);
            closed += 1;
        }
        log::debug!(
            "closed {closed} inode descriptor(s); {} open, budget {}",
            self.fds.load(Ordering::Relaxed),
            self.budget
        );
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
        let i = match self.use_known(&mut m, ino)? {
            Some(i) => i,
            None => {
                let i = self.new_inode(ino, make(), 0);
                m.insert(ino, i.clone());
                if self.fds.load(Ordering::Relaxed) > self.budget {
                    self.evict(&mut m);
                }
                i
            }
        };
        if let Node::Real(r) = &i.node
            && r.mount.closing()
        {
            if i.lookups.load(Ordering::Relaxed) == 0
                && let Some(gone) = m.remove(&ino)
            {
                self.dropped(&gone);
            }
            return Err(estale(format!(
                "inode {ino:#x}: its image or snapshot is being changed"
            )));
        }
        i.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(i)
    }

    /// Is `ino` known? (Not reopened if evicted: for bookkeeping only.)
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
            if prev <= n
                && let Some(gone) = m.remove(&ino)
            {
                self.dropped(&gone);
            }
        }
    }

    /// Drop every inode of a destroyed device (and its `.snapshots`): the
    /// kernel's later requests for them get ESTALE, and a new device that
    /// reuses the id starts with fresh inodes.
    pub fn purge_dev(&self, dev: DeviceId) -> usize {
        let mut m = self.map.lock();
        let before = m.len();
        let mut real = 0;
        m.retain(|_, i| {
            let keep = match &i.node {
                Node::Real(r) => r.dev != dev,
                Node::Evicted(e) => e.dev != dev,
                Node::SnapDir(d) => *d != dev,
                Node::ControlFile(ControlFile::Info(d)) => *d != dev,
                _ => true,
            };
            if !keep && matches!(i.node, Node::Real(_)) {
                real += 1;
            }
            keep
        });
        self.fds.fetch_sub(real, Ordering::Relaxed);
        before - m.len()
    }

    /// Number of inodes held, and how many of them hold a descriptor.
    pub fn counts(&self) -> (usize, usize) {
        (self.map.lock().len(), self.fds.load(Ordering::Relaxed))
    }
}
