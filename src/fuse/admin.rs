//! Namespace changes asked over the control socket (the CLI): the same
//! rules as mkdir/rmdir/mv through the mount, plus what only the CLI can
//! do (clone, rollback, resize, labels, recursive destroy). Changes that
//! remove or replace a device drop its inodes and tell the kernel to forget
//! the directory entry, so nobody sees stale content.

use super::inode;
use super::{Caller, Core};
use crate::engine::DeviceEntry;
use crate::engine::Holders;
use crate::engine::{DeviceInfo, Engine, Target};
use crate::error::{Error, Result};
use crate::types::DeviceKind;
use crate::types::{Bytes, Name};
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

    /// `thinfs create`.
    pub fn admin_create(&self, c: &Caller, name: &Name, size: Option<Bytes>) -> Result<DeviceInfo> {
        self.require_admin(c, &format!("create {name}"))?;
        let r = self.engine.create_image(name, size)?;
        self.inval(inode::ROOT_INO, name.as_str());
        self.engine.info(&r, false)
    }

    /// `thinfs snapshot NAME@SNAP`.
    pub fn admin_snapshot(&self, c: &Caller, t: &Target) -> Result<DeviceInfo> {
        let snap = t
            .snap
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("snapshot needs NAME@SNAP, got {t}")))?;
        self.require_admin(c, &format!("snapshot {t}"))?;
        let img = self.engine.resolve(&Target {
            image: t.image.clone(),
            snap: None,
        })?;
        let r = self.engine.snapshot(img.id, snap)?;
        self.engine.info(&r, false)
    }

    /// `thinfs clone NAME@SNAP NEW`.
    pub fn admin_clone(&self, c: &Caller, src: &Target, new: &Name) -> Result<DeviceInfo> {
        self.require_admin(c, &format!("clone {src} to {new}"))?;
        let r = self.engine.clone_snapshot(src, new)?;
        self.inval(inode::ROOT_INO, new.as_str());
        self.engine.info(&r, false)
    }

    /// `thinfs destroy TARGET [-r]`.
    pub fn admin_destroy(&self, c: &Caller, t: &Target, recursive: bool) -> Result<()> {
        self.require_admin(c, &format!("destroy {t}"))?;
        self.engine.destroy(t, recursive)
    }

    /// `thinfs rollback NAME@SNAP [--destroy-newer]`.
    pub fn admin_rollback(&self, c: &Caller, t: &Target, destroy_newer: bool) -> Result<()> {
        self.require_admin(c, &format!("rollback to {t}"))?;
        self.engine.rollback(t, destroy_newer)
    }

    /// `thinfs rename OLD NEW` (an image, or `NAME@A NAME@B`/`NAME@A B`).
    pub fn admin_rename(&self, c: &Caller, t: &Target, new: &Name) -> Result<()> {
        self.require_admin(c, &format!("rename {t}"))?;
        self.engine.rename(t, new)
    }

    /// `thinfs resize NAME SIZE`: online where the kernel lets us (needs
    /// CAP_SYS_RESOURCE); otherwise, if no file is open in the image, it is
    /// grown offline and mounted again on next use.
    pub fn admin_resize(&self, c: &Caller, t: &Target, size: Bytes) -> Result<()> {
        self.require_admin(c, &format!("resize {t}"))?;
        self.engine.resize(t, size)
    }

    /// `thinfs fsck TARGET`: check and repair its filesystem offline (no
    /// file may be open in it); it is mounted again on next use.
    pub fn admin_fsck(&self, c: &Caller, t: &Target) -> Result<(i32, String)> {
        self.require_admin(c, &format!("fsck {t}"))?;
        self.engine.fsck(t)
    }

    /// `thinfs label TARGET KEY[=VALUE]`.
    pub fn admin_label(
        &self,
        c: &Caller,
        t: &Target,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        self.require_admin(c, &format!("label {t}"))?;
        if key.is_empty() || key.len() > 255 || key.contains('=') || key.contains('\0') {
            return Err(Error::Invalid(format!(
                "bad label key {key:?} (1-255 bytes, no '=' or NUL)"
            )));
        }
        self.engine.set_label(t, key, value)
    }
}
