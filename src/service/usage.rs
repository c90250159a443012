//! The usage cache: every device with its usage, for any front end
//! (`.thinfs/devices.json`, the control socket's `list` and `usage`), and
//! the bound on the work it costs.
//!
//! The devices themselves (names, labels, parents, states) are never older
//! than a change that completed before the ask: each view is stamped with
//! the pool's transaction id read before it was made, and one stamped
//! older than the current id is never handed out as it is. Only usage
//! numbers may be older: usage walks the extents of devices (0.6 s for a
//! device of 180k extents) and any user may ask, so a full scan runs at
//! most once at a time, and its usage is reused by askers that come within
//! four times its duration (so full scans take at most a fifth of one
//! core). An asker that comes after a change within that time, or finds a
//! full scan under way, gets the device list read afresh (no extents
//! walked) with the last scan's usage of the backend devices it knows;
//! only devices made since are scanned, one at a time. So askers never
//! wait for a full scan on FUSE or control threads.

use super::Service;
use crate::engine::DeviceInfo;
use crate::error::Result;
use crate::types::DeviceId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A full scan is reused for this many times its duration.
const REUSE_FACTOR: u32 = 4;

struct Scan {
    /// When the full scan whose usage this view shows ended, and its length.
    at: Instant,
    took: Duration,
    /// The pool's transaction id read before the device list was.
    txid: u64,
    devices: Arc<Vec<DeviceInfo>>,
}

impl Scan {
    fn fresh(&self) -> bool {
        self.at.elapsed() < self.took * REUSE_FACTOR
    }
}

/// The last full usage scan, and the lock that lets one scan run at a time.
#[derive(Default)]
pub struct Scans {
    last: Mutex<Option<Arc<Scan>>>,
    running: Mutex<()>,
}

impl Service {
    /// Every device with its usage, within the bounds above.
    pub fn devices_with_usage(&self) -> Result<Arc<Vec<DeviceInfo>>> {
        let scans = &self.scans;
        let txid = self.engine.transaction_id()?;
        let last = scans.last.lock().clone();
        if let Some(s) = last.as_ref().filter(|s| s.fresh()) {
            return self.current(s, txid);
        }
        let _run = match (scans.running.try_lock(), &last) {
            (Some(g), _) => g,
            (None, Some(prev)) => return self.current(prev, txid),
            (None, None) => scans.running.lock(),
        };
        // Another asker may have finished a scan while this one waited.
        let now = scans.last.lock().clone();
        if let Some(s) = now.as_ref().filter(|s| s.fresh())
            && !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, s))
        {
            return self.current(s, txid);
        }
        let txid = self.engine.transaction_id()?;
        let t0 = Instant::now();
        let devices = Arc::new(self.engine.list_info(true)?);
        *scans.last.lock() = Some(Arc::new(Scan {
            at: Instant::now(),
            took: t0.elapsed(),
            txid,
            devices: devices.clone(),
        }));
        Ok(devices)
    }

    /// The devices of `s` if nothing changed since it was made (`txid` is
    /// the transaction id now); else the device list read afresh with the
    /// usage `s` knows, and the devices made since scanned. The new view
    /// replaces `s` for later askers.
    fn current(&self, s: &Arc<Scan>, txid: u64) -> Result<Arc<Vec<DeviceInfo>>> {
        if s.txid >= txid {
            return Ok(s.devices.clone());
        }
        let key = |d: &DeviceInfo| (d.record.id, d.record.dev, d.record.seq);
        let known: HashMap<_, _> = s.devices.iter().map(|d| (key(d), d.usage)).collect();
        let mut devices = self.engine.list_info(false)?;
        for d in devices.iter_mut() {
            match known.get(&key(d)) {
                Some(u) => d.usage = *u,
                None => {
                    let _run = self.scans.running.lock();
                    *d = self.engine.info(&d.record, true)?;
                }
            }
        }
        let devices = Arc::new(devices);
        let mut last = self.scans.last.lock();
        if last.as_ref().is_some_and(|l| Arc::ptr_eq(l, s)) {
            *last = Some(Arc::new(Scan {
                at: s.at,
                took: s.took,
                txid,
                devices: devices.clone(),
            }));
        }
        Ok(devices)
    }

    /// One device with its usage; scans of one device wait for each other
    /// and for a full scan (one scan at a time).
    pub fn info_with_usage(&self, id: DeviceId) -> Result<DeviceInfo> {
        let r = self.engine.record(id)?;
        let _run = self.scans.running.lock();
        self.engine.info(&r, true)
    }
}
