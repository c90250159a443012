//! The FUSE layer: decodes kernel requests, calls the service (mkdir,
//! rmdir and mv of images and snapshots) or the engine (lookups of the
//! namespace: images, `.snapshots`, `.thinfs`), or passes file operations
//! through to the inner filesystems as the calling user, and maps every
//! error to an errno. No graph logic and no rights check lives here.
//!
//! Files: `inode` (inode numbers and table), `attr` (stat -> FileAttr),
//! `namespace` (virtual directories, service calls), `holders` (what the
//! engine asks of the mount, kernel invalidation, idle expiry), `entries` (lookup,
//! create, link, rename... inside images), `files` (open, read, write,
//! setattr, xattrs...), `dirs` (readdir), `control` (`.thinfs` content,
//! shared between opens), `budget` (what each uid's open handles may hold),
//! `identity` (acting as the caller), `ops` (the `fuser::Filesystem` trait), `dispatch` (virtual or inner path
//! by the kind of inode), `open` (open and create replies), `reply` (error
//! to errno).

mod attr;
mod budget;
mod control;
mod dirs;
mod dispatch;
mod entries;
mod files;
mod holders;
mod identity;
mod inode;
mod namespace;
mod open;
mod ops;
mod reply;

use crate::engine::{Engine, OpenToken};
use crate::error::{Error, Result};
pub use crate::service::Caller;
use crate::service::Service;
use crate::types::DeviceId;
use fuser::{BackingId, Request};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use inode::{CONTROL_INO, ROOT_INO};

/// Options of the FUSE layer.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Show `.snapshots` and the inner `lost+found` in directory listings.
    pub show_hidden: bool,
    /// Attribute and entry cache time. Every change to an image goes through
    /// this mount, and changes made by the CLI (rollback, destroy, rename)
    /// invalidate the kernel's entries, so a long time is safe.
    pub ttl: Duration,
    /// Members of this group may change images and snapshots, as root may.
    pub admin_group: Option<(String, u32)>,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            show_hidden: false,
            ttl: Duration::from_secs(10),
            admin_group: None,
        }
    }
}

/// Counters, readable by tests and `.thinfs`.
#[derive(Debug, Default)]
pub struct Stats {
    /// READ requests that reached the daemon.
    pub reads: AtomicU64,
    /// WRITE requests that reached the daemon.
    pub writes: AtomicU64,
    /// Opens answered with kernel passthrough.
    pub passthrough_opens: AtomicU64,
    /// Requests for which a caller's supplementary groups were read from
    /// `/proc` (the others did not need them).
    pub group_reads: AtomicU64,
}

/// An entry of a virtual directory listing.
type VirtualEntry = (u64, fuser::FileType, OsString);

/// An open file or directory. Each holds what it costs against its
/// opener's share (`budget`), given back when the handle goes.
#[derive(Debug)]
enum Handle {
    File {
        /// The inode, to reopen the file when a request needs it.
        ino: u64,
        /// The open's flags, for that reopening.
        flags: i32,
        /// The daemon's own descriptor: only without passthrough. With
        /// passthrough the kernel holds the backing file, and requests
        /// that reach the daemon (fsync, fallocate, lseek...) reopen it.
        file: Option<File>,
        /// Shares the inode's passthrough registration while open.
        _backing: Option<Arc<BackingId>>,
        /// Keeps the device from going offline; dropped after the file.
        _open: OpenToken,
        _held: budget::Held,
    },
    Dir {
        dir: Mutex<File>,
        dev: DeviceId,
        is_root: bool,
        /// Keeps the device from going offline; dropped after the file.
        _open: OpenToken,
        _held: budget::Held,
    },
    Virtual {
        /// Shared by the handles that opened the same listing.
        entries: Arc<[VirtualEntry]>,
        _held: budget::Held,
    },
    /// A `.thinfs` file: the rendering shared by the opens that saw it.
    Content {
        data: Arc<[u8]>,
        _held: budget::Held,
    },
}

/// The caller of a FUSE request, as the service sees it.
fn caller_of(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        groups: None,
    }
}

/// The thinfs FUSE filesystem, as handed to the FUSE session.
pub struct ThinFs(Arc<Core>);

impl std::ops::Deref for ThinFs {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

/// The state of the filesystem, shared by the FUSE session and the
/// control socket (which changes the namespace too: destroy, rollback).
pub struct Core {
    engine: Arc<Engine>,
    service: Arc<Service>,
    inodes: inode::InodeTable,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    opts: FuseOptions,
    started: SystemTime,
    passthrough: AtomicBool,
    stats: Arc<Stats>,
    notifier: std::sync::OnceLock<fuser::Notifier>,
    /// Per-uid bounds on what open handles hold.
    budget: Arc<budget::Budget>,
    /// The last rendering of each `.thinfs` file, shared by its opens.
    contents: Mutex<HashMap<inode::ControlFile, control::Rendered>>,
    /// The last listing of each virtual directory, shared by its opens.
    listings: Mutex<HashMap<u64, Arc<[VirtualEntry]>>>,
}

impl ThinFs {
    /// A filesystem over `engine`.
    pub fn new(engine: Arc<Engine>, opts: FuseOptions) -> ThinFs {
        let core = Arc::new(Core::new(engine.clone(), opts));
        let weak = Arc::downgrade(&core);
        engine.set_holders(weak);
        ThinFs(core)
    }

    /// The shared core, for the control socket.
    pub fn core(&self) -> Arc<Core> {
        self.0.clone()
    }
}

impl Core {
    fn new(engine: Arc<Engine>, opts: FuseOptions) -> Core {
        Core {
            service: Arc::new(Service::new(engine.clone(), opts.admin_group.clone())),
            engine,
            inodes: inode::InodeTable::new(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            opts,
            started: SystemTime::now(),
            passthrough: AtomicBool::new(false),
            stats: Arc::new(Stats::default()),
            notifier: std::sync::OnceLock::new(),
            budget: Arc::new(budget::Budget::from_rlimit()),
            contents: Mutex::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.lock().get(&fh).cloned().ok_or_else(|| {
            Error::io(
                format!("file handle {fh}"),
                std::io::Error::from_raw_os_error(libc::EBADF),
            )
        })
    }

    fn drop_handle(&self, fh: u64) -> Option<Arc<Handle>> {
        self.handles.lock().remove(&fh)
    }

    /// Forget everything of a destroyed device.
    fn purge(&self, dev: DeviceId) {
        let n = self.inodes.purge_dev(dev);
        log::debug!("dropped {n} inode(s) of destroyed device id {dev}");
    }
}
