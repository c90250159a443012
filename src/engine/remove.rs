//! Destroy images and snapshots.
//!
//! Order: the devices are taken offline (EBUSY, with nothing changed, while
//! files are open in them; their superblocks are gone before anything
//! else happens); one transaction removes the record, re-parents its clones
//! to its own parent and queues its backend device in `gc`; then the device
//! is deleted and the `gc` entry dropped. A crash after the transaction
//! leaves a `gc` entry that the next open finishes.

use super::{Engine, Offline, Target, failpoint};
use crate::error::{Error, IoContext, Result};
use crate::meta::{DeviceKind, DeviceRecord};
use crate::sys::file;
use crate::types::DeviceId;
use std::ffi::OsStr;

/// Entries an empty image may still hold.
const EMPTY_IMAGE_ENTRIES: [&str; 3] = [".", "..", "lost+found"];

impl Engine {
    /// Destroy `target`. An image with snapshots needs `recursive`.
    pub fn destroy(&self, target: &Target, recursive: bool) -> Result<()> {
        let rec = self.resolve(target)?;
        let mut victims = Vec::new();
        if rec.kind == DeviceKind::Image {
            let snaps = self.snapshots_of(rec.id)?;
            if !snaps.is_empty() && !recursive {
                return Err(Error::NotEmpty(format!(
                    "image {} has {} snapshot(s); destroy them first or use -r",
                    rec.name,
                    snaps.len()
                )));
            }
            victims.extend(snaps);
        }
        victims.push(rec.clone());
        self.with_offline(&victims, &format!("destroy {target}"), |off| {
            if rec.kind == DeviceKind::Image {
                self.same_snapshots(rec.id, &victims[..victims.len() - 1])?;
            }
            for v in &victims {
                self.destroy_offline(v.id, off)?;
            }
            Ok(())
        })
    }

    /// Destroy one device by id (an image must have no snapshots left).
    pub fn destroy_id(&self, id: DeviceId) -> Result<()> {
        let rec = self.record(id)?;
        let what = format!("destroy {}", self.log_name(&rec));
        self.with_offline(&[rec], &what, |off| self.destroy_offline(id, off))
    }

    /// `rmdir` of an image: destroy it only if its filesystem holds nothing
    /// but `lost+found` and it has no snapshots (ENOTEMPTY otherwise).
    pub fn destroy_if_empty(&self, name: &crate::types::Name) -> Result<()> {
        let rec = self.resolve(&Target {
            image: name.clone(),
            snap: None,
        })?;
        if !self.snapshots_of(rec.id)?.is_empty() {
            return Err(Error::NotEmpty(format!("image {name} has snapshots")));
        }
        // A first look through the live mount, so that a non-empty image is
        // refused without disturbing anybody who works in it.
        let m = self.mount(rec.id)?;
        Self::check_empty(name, m.root())?;
        drop(m);
        self.with_offline(
            std::slice::from_ref(&rec),
            &format!("destroy image {name}"),
            |off| {
                if !self.snapshots_of(rec.id)?.is_empty() {
                    return Err(Error::NotEmpty(format!("image {name} has snapshots")));
                }
                // Again, on a private read-only mount: nothing can be created
                // between this look and the destroy.
                let r = self.ready(rec.id)?;
                let priv_mount = self.mount_dev(&r, true)?;
                Self::check_empty(name, priv_mount.root())?;
                drop(priv_mount);
                self.wait_released(rec.id, std::time::Duration::from_secs(10))?;
                self.destroy_offline(rec.id, off)
            },
        )
    }

    fn check_empty(name: &crate::types::Name, root: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        let dir = file::reopen(root, libc::O_RDONLY | libc::O_DIRECTORY)
            .ctx(|| format!("open image {name}"))?;
        let mut off = 0;
        loop {
            let ents = file::read_dir_at(&dir, off).ctx(|| format!("read image {name}"))?;
            if ents.is_empty() {
                return Ok(());
            }
            for e in &ents {
                off = e.off;
                if !EMPTY_IMAGE_ENTRIES.iter().any(|n| OsStr::new(n) == e.name) {
                    return Err(Error::NotEmpty(format!(
                        "image {name} is not empty ({:?})",
                        e.name
                    )));
                }
            }
        }
    }

    /// The snapshots of `image` are still exactly `expected` (checked with
    /// the devices offline, after they were listed without locks).
    pub(super) fn same_snapshots(&self, image: DeviceId, expected: &[DeviceRecord]) -> Result<()> {
        let mut now: Vec<DeviceId> = self.snapshots_of(image)?.iter().map(|r| r.id).collect();
        let mut was: Vec<DeviceId> = expected.iter().map(|r| r.id).collect();
        now.sort_unstable();
        was.sort_unstable();
        if now != was {
            return Err(Error::Busy(
                "snapshots of the image changed meanwhile; nothing was done, try again".into(),
            ));
        }
        Ok(())
    }

    /// Destroy one device that `off` holds offline.
    pub(super) fn destroy_offline(&self, id: DeviceId, off: &Offline) -> Result<()> {
        if !off.holds(id) {
            return Err(Error::Busy(format!("device id {id} is not offline")));
        }
        let rec = self.record(id)?;
        if rec.kind == DeviceKind::Image && !self.snapshots_of(id)?.is_empty() {
            return Err(Error::NotEmpty(format!("image {} has snapshots", rec.name)));
        }
        let children: Vec<DeviceRecord> = self
            .meta
            .children(id)?
            .into_iter()
            .filter_map(|c| self.meta.get(c).ok().flatten())
            .collect();
        let name = self.log_name(&rec);
        self.meta.txn(|t| {
            t.remove(id)?;
            for c in &children {
                let mut c = c.clone();
                c.parent = rec.parent;
                t.put(&c)?;
            }
            t.gc_add(rec.dev)?;
            if let Some(p) = rec.pending_dev {
                t.gc_add(p)?;
            }
            Ok(())
        })?;
        failpoint("destroy.intent");
        self.collect_garbage()?;
        log::info!(
            "destroyed {name} (id {id}); {} clone(s) re-parented",
            children.len()
        );
        Ok(())
    }

    /// Delete every backend device queued in `gc`, then give space back.
    pub fn collect_garbage(&self) -> Result<()> {
        let gc = self.meta.gc_list()?;
        if gc.is_empty() {
            return Ok(());
        }
        for dev in gc {
            self.backend.delete(dev)?;
            failpoint("destroy.backend");
            self.meta.gc_done(dev)?;
        }
        if let Err(e) = self.backend.trim() {
            log::warn!("trim of the pool failed (space is reused, not returned to the host): {e}");
        }
        Ok(())
    }
}
