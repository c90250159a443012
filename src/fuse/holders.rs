//! What the mount holds of devices, seen from the engine and the service:
//! it implements [`Holders`] (drop cached inodes of a device taken offline,
//! tell the kernel to forget an entry), sends the kernel's invalidations,
//! and runs idle expiry. Changes themselves go through the service.

use super::Core;
use super::inode;
use crate::engine::{DeviceEntry, Engine, Holders};
use crate::service::Service;
use crate::types::DeviceKind;
use std::cell::Cell;
use std::ffi::OsStr;
use std::sync::Arc;

thread_local! {
    /// Set while this thread serves a kernel request that changes a virtual
    /// directory (rmdir, rename there): the kernel holds that directory's
    /// lock and updates its own entries, so notifying it would deadlock.
    static IN_NAMESPACE_REQUEST: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as serving a namespace request until dropped.
pub(super) struct NamespaceRequest;

impl NamespaceRequest {
    pub(super) fn enter() -> NamespaceRequest {
        IN_NAMESPACE_REQUEST.with(|f| f.set(true));
        NamespaceRequest
    }
}

impl Drop for NamespaceRequest {
    fn drop(&mut self) {
        IN_NAMESPACE_REQUEST.with(|f| f.set(false));
    }
}

impl Holders for Core {
    fn drop_cached(&self, r: &DeviceEntry) {
        self.purge(r.id);
    }

    fn invalidate(&self, r: &DeviceEntry) {
        if IN_NAMESPACE_REQUEST.with(|f| f.get()) {
            return;
        }
        let (p, n) = self.entry_of_record(r);
        self.inval(p, &n);
    }
}

impl Core {
    /// The engine (inspection goes straight to it).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Set the kernel notifier once the session exists.
    pub fn set_notifier(&self, n: fuser::Notifier) {
        let _ = self.notifier.set(n);
    }

    /// Ask the kernel to forget `name` in directory `parent`.
    fn inval(&self, parent: u64, name: &str) {
        if let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_entry(fuser::INodeNo(parent), OsStr::new(name))
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::debug!("invalidate {name:?} in {parent:#x}: {e}");
        }
    }

    /// Where a device's directory entry lives: (parent inode, name).
    fn entry_of_record(&self, r: &DeviceEntry) -> (u64, String) {
        match (r.kind, r.parent) {
            (DeviceKind::Snapshot, Some(img)) => (inode::snapdir_ino(img), r.name.to_string()),
            _ => (inode::ROOT_INO, r.name.to_string()),
        }
    }

    /// Unmount images and snapshots idle for `idle` or more (no open file
    /// or directory in them, no use since) and ask the kernel to drop their
    /// directory entries, so that it forgets their inodes and the
    /// filesystem really goes away. A device the kernel still holds (a cwd,
    /// an inotify watch) stays mounted and is reused. Returns how many were
    /// released.
    pub fn expire_idle(&self, idle: std::time::Duration) -> usize {
        let now = crate::engine::now_secs();
        let mut n = 0;
        for (id, last, open) in self.engine.mounted_ids() {
            if now.saturating_sub(last) < idle.as_secs() || open > 0 {
                continue;
            }
            let Ok(r) = self.engine.entry(id) else {
                continue;
            };
            self.engine.unmount(id);
            let (p, name) = self.entry_of_record(&r);
            self.inval(p, &name);
            n += 1;
        }
        n
    }

    /// The service every front end calls for changes.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }
}
