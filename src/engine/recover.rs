//! Reconcile records with the backend at open.
//!
//! - `Creating`: the creation never finished: the record goes and its
//!   backend device is queued for deletion.
//! - `RollingBack`: the swap never happened: the pending device is queued
//!   for deletion and the image is `Ready` again, unchanged.
//! - `Ready` whose backend device is missing: `Faulty`, with the reason.
//! - `gc` entries: deleted.
//! - backend devices no record or gc entry knows (orphans): deleted.
//!
//! Mounts and loop devices need no cleaning: inner mounts are detached and
//! loop devices autoclear, so the kernel dropped them with the old process.

use super::Engine;
use crate::error::Result;
use crate::meta::DeviceState;

impl Engine {
    pub(super) fn recover(&self) -> Result<()> {
        let mut fixed = 0;
        for rec in self.meta.list()? {
            match rec.state {
                DeviceState::Creating => {
                    log::warn!(
                        "recovery: {} was being created; removing it",
                        self.log_name(&rec)
                    );
                    self.meta.txn(|t| {
                        t.remove(rec.id)?;
                        t.gc_add(rec.dev)
                    })?;
                    fixed += 1;
                }
                DeviceState::RollingBack => {
                    log::warn!(
                        "recovery: rollback of {} was interrupted; keeping its old content",
                        rec.name
                    );
                    let mut r = rec.clone();
                    let pending = r.pending_dev.take();
                    r.state = DeviceState::Ready;
                    self.meta.txn(|t| {
                        t.put(&r)?;
                        if let Some(p) = pending {
                            t.gc_add(p)?;
                        }
                        Ok(())
                    })?;
                    fixed += 1;
                }
                DeviceState::Ready => {
                    if !self.backend.exists(rec.dev)? {
                        let why = format!("backend device {} is missing", rec.dev);
                        log::error!("recovery: {} is faulty: {why}", self.log_name(&rec));
                        let mut r = rec.clone();
                        r.state = DeviceState::Faulty;
                        r.error = Some(why);
                        self.meta.txn(|t| t.put(&r))?;
                        fixed += 1;
                    }
                }
                DeviceState::Faulty => {}
            }
        }
        let gc = self.meta.gc_list()?.len();
        self.collect_garbage()?;
        let used = self.meta.used_devs()?;
        let mut orphans = 0;
        for dev in self.backend.list()? {
            if !used.contains(&dev.get()) {
                log::warn!("recovery: backend device {dev} has no record; deleting it");
                self.backend.delete(dev)?;
                orphans += 1;
            }
        }
        if fixed + gc + orphans > 0 {
            log::warn!(
                "recovery: {fixed} record(s) repaired, {gc} pending deletion(s) finished, {orphans} orphan(s) deleted"
            );
            let _ = self.backend.trim();
        }
        Ok(())
    }
}
