//! Destroy images and snapshots.
//!
//! Order: one transaction removes the record, re-parents its clones to its
//! own parent and queues its backend device in `gc`; then the device is
//! deleted and the `gc` entry dropped. A crash after the transaction leaves
//! a `gc` entry that the next open finishes.

use super::{Engine, Target, failpoint};
use crate::error::{Error, Result};
use crate::meta::{DeviceKind, DeviceRecord};
use crate::types::DeviceId;

impl Engine {
    /// Destroy `target`. An image with snapshots needs `recursive`.
    pub fn destroy(&self, target: &Target, recursive: bool) -> Result<()> {
        let rec = self.resolve(target)?;
        if rec.kind == DeviceKind::Image {
            let snaps = self.snapshots_of(rec.id)?;
            if !snaps.is_empty() {
                if !recursive {
                    return Err(Error::NotEmpty(format!(
                        "image {} has {} snapshot(s); destroy them first or use -r",
                        rec.name,
                        snaps.len()
                    )));
                }
                for s in snaps {
                    self.destroy_id(s.id)?;
                }
            }
        }
        self.destroy_id(rec.id)
    }

    /// Destroy one device by id (an image must have no snapshots left).
    pub fn destroy_id(&self, id: DeviceId) -> Result<()> {
        let lock = self.lock_of(id);
        let _g = lock.lock();
        let rec = self.record(id)?;
        if rec.kind == DeviceKind::Image && !self.snapshots_of(id)?.is_empty() {
            return Err(Error::NotEmpty(format!("image {} has snapshots", rec.name)));
        }
        self.unmount(id);
        let children: Vec<DeviceRecord> = self
            .meta
            .children(id)?
            .into_iter()
            .filter_map(|c| self.meta.get(c).ok().flatten())
            .collect();
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
            "destroyed {} (id {id}); {} clone(s) re-parented",
            self.log_name(&rec),
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
