//! Content of the read-only inspection files in `.thinfs/`, and the bound
//! on the work they cost.
//!
//! `devices.json` and `info/NAME` show usage, which walks the extents of
//! devices (0.6 s for a device of 180k extents): any user can read them,
//! so a `stat` never scans (their size is reported as 0, as in /proc; they
//! are opened with direct I/O and read to their end), a read scans at most
//! once at a time, and a full scan is reused by readers that come within
//! four times its duration (so scans take at most a fifth of one core).
//! A reader that finds a scan under way gets the previous result instead
//! of waiting, so readers never pile up on the FUSE threads.

use super::Core;
use super::inode::ControlFile;
use crate::engine::DeviceInfo;
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out =
        serde_json::to_vec_pretty(v).map_err(|e| Error::Corrupt(format!("encode json: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

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

impl Core {
    /// Every device with its usage, within the bounds above. For
    /// `.thinfs/devices.json` and the control socket's `list` and `usage`.
    pub fn devices_with_usage(&self) -> Result<Arc<Vec<DeviceInfo>>> {
        let last = self.scans.last.lock().clone();
        if let Some(s) = last.as_ref().filter(|s| s.fresh()) {
            return Ok(s.devices.clone());
        }
        let _run = match (self.scans.running.try_lock(), &last) {
            (Some(g), _) => g,
            (None, Some(prev)) => return Ok(prev.devices.clone()),
            (None, None) => self.scans.running.lock(),
        };
        // Another reader may have finished a scan while this one waited.
        if let Some(s) = self.scans.last.lock().as_ref().filter(|s| s.fresh())
            && !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, s))
        {
            return Ok(s.devices.clone());
        }
        let t0 = Instant::now();
        let devices = Arc::new(self.engine.list_info(true)?);
        *self.scans.last.lock() = Some(Arc::new(Scan {
            at: Instant::now(),
            took: t0.elapsed(),
            devices: devices.clone(),
        }));
        Ok(devices)
    }

    /// Size of a `.thinfs` file for `stat`: cheap, never a device scan.
    pub(super) fn control_len(&self, f: ControlFile) -> Result<u64> {
        match f {
            ControlFile::PoolJson | ControlFile::Tree => Ok(self.control_content(f)?.len() as u64),
            ControlFile::DevicesJson | ControlFile::Info(_) => Ok(0),
        }
    }

    /// Bytes of a `.thinfs` file, made fresh.
    pub(super) fn control_content(&self, f: ControlFile) -> Result<Vec<u8>> {
        match f {
            ControlFile::PoolJson => {
                let p = self.engine.pool_info()?;
                let v = serde_json::json!({
                    "pool": p,
                    "fuse": {
                        "passthrough": self.passthrough.load(Ordering::Relaxed),
                        "reads_in_daemon": self.stats.reads.load(Ordering::Relaxed),
                        "writes_in_daemon": self.stats.writes.load(Ordering::Relaxed),
                        "passthrough_opens": self.stats.passthrough_opens.load(Ordering::Relaxed),
                        "inodes": self.inodes.counts().0,
                        "inode_fds": self.inodes.counts().1,
                        "mounted_devices": self.engine.live_mounts(),
                        "max_mounts_per_device": self.engine.mount_census().1,
                    }
                });
                json(&v)
            }
            ControlFile::DevicesJson => json(&*self.devices_with_usage()?),
            ControlFile::Tree => Ok(self.engine.tree_text()?.into_bytes()),
            ControlFile::Info(id) => {
                let r = self.engine.record(id)?;
                let _run = self.scans.running.lock();
                json(&self.engine.info(&r, true)?)
            }
        }
    }
}
