//! Content of the read-only inspection files in `.thinfs/`, and the bound
//! on the work they cost.
//!
//! `devices.json` and `info/NAME` show usage, which walks the extents of
//! devices: any user can read them, so a `stat` never scans (their size is
//! reported as 0, as in /proc; they are opened with direct I/O and read to
//! their end), and a read goes through the service's usage cache
//! (`service::usage`), which bounds the scans.

use super::Core;
use super::inode::ControlFile;
use crate::engine::DeviceInfo;
use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::Ordering;

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out =
        serde_json::to_vec_pretty(v).map_err(|e| Error::Corrupt(format!("encode json: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

impl Core {
    /// Every device with its usage (the service's cache bounds the work).
    pub fn devices_with_usage(&self) -> Result<Arc<Vec<DeviceInfo>>> {
        self.service.devices_with_usage()
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
                        "group_reads": self.stats.group_reads.load(Ordering::Relaxed),
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
            ControlFile::Info(id) => json(&self.service.info_with_usage(id)?),
        }
    }
}
