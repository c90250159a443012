//! The usage cache: every device with its usage, for any front end
//! (`.thinfs/devices.json`, the control socket's `list` and `usage`), and
//! the bound on the work it costs.
//!
//! Usage walks the extents of devices (0.6 s for a device of 180k
//! extents) and any user may ask, so a scan runs at most once at a time,
//! and a full scan is reused by askers that come within four times its
//! duration (so scans take at most a fifth of one core). An asker that
//! finds a scan under way gets the previous result instead of waiting, so
//! askers never pile up on FUSE or control threads.

use super::Service;
use crate::engine::DeviceInfo;
use crate::error::Result;
use crate::types::DeviceId;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A full scan is reused for this many times its duration.
const REUSE_FACTOR: u32 = 4;

struct Scan {
    at: Instant,
    took: Duration,
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
        let last = scans.last.lock().clone();
        if let Some(s) = last.as_ref().filter(|s| s.fresh()) {
            return Ok(s.devices.clone());
        }
        let _run = match (scans.running.try_lock(), &last) {
            (Some(g), _) => g,
            (None, Some(prev)) => return Ok(prev.devices.clone()),
            (None, None) => scans.running.lock(),
        };
        // Another asker may have finished a scan while this one waited.
        if let Some(s) = scans.last.lock().as_ref().filter(|s| s.fresh())
            && !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, s))
        {
            return Ok(s.devices.clone());
        }
        let t0 = Instant::now();
        let devices = Arc::new(self.engine.list_info(true)?);
        *scans.last.lock() = Some(Arc::new(Scan {
            at: Instant::now(),
            took: t0.elapsed(),
            devices: devices.clone(),
        }));
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
