//! Content of the read-only inspection files in `.thinfs/`, and the bound
//! on the work they cost.
//!
//! `devices.json` and `info/NAME` show usage, which walks the extents of
//! devices: any user can read them, so a `stat` never scans (their size is
//! reported as 0, as in /proc; they are opened with direct I/O and read to
//! their end), and a read goes through the service's usage cache
//! (`service::usage`), which bounds the scans.
//!
//! Opens share renderings: an open that renders the same bytes as the last
//! open of that file (or, for `devices.json`, comes from the same usage
//! scan, which is not rendered again) gets the same copy, so any number of
//! opens of an unchanged file cost one copy; each uid's opens may keep
//! only a bounded number of bytes of distinct copies alive (`budget`).
//! Virtual directory listings are shared the same way.

use super::inode::{ControlFile, Inode};
use super::{Core, VirtualEntry};
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

/// Files and listings whose last rendering is kept, at most.
const CACHED: usize = 256;

/// The last rendering of a `.thinfs` file.
#[derive(Debug)]
pub(super) struct Rendered {
    data: Arc<[u8]>,
    /// The usage scan it was made from (`devices.json`).
    from: Option<Arc<Vec<DeviceInfo>>>,
}

/// Bytes a listing costs, about.
pub(super) fn listing_bytes(entries: &[VirtualEntry]) -> usize {
    entries
        .iter()
        .map(|e| e.2.len() + std::mem::size_of::<VirtualEntry>())
        .sum()
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

    /// Bytes of a `.thinfs` file for an open: fresh, but the same copy as
    /// the last open's when nothing changed.
    pub(super) fn control_shared(&self, f: ControlFile) -> Result<Arc<[u8]>> {
        let (data, from) = match f {
            ControlFile::DevicesJson => {
                let devs = self.devices_with_usage()?;
                if let Some(r) = self.contents.lock().get(&f)
                    && r.from.as_ref().is_some_and(|d| Arc::ptr_eq(d, &devs))
                {
                    return Ok(r.data.clone());
                }
                (json(&*devs)?, Some(devs))
            }
            _ => (self.control_content(f)?, None),
        };
        let mut c = self.contents.lock();
        if let Some(r) = c.get_mut(&f) {
            if *r.data == *data {
                r.from = from;
                return Ok(r.data.clone());
            }
        } else if c.len() >= CACHED {
            c.clear();
        }
        let data: Arc<[u8]> = data.into();
        c.insert(
            f,
            Rendered {
                data: data.clone(),
                from,
            },
        );
        Ok(data)
    }

    /// The listing of virtual directory `i` for an open: fresh, but the
    /// same copy as the last open's when nothing changed.
    pub(super) fn listing_shared(
        &self,
        i: &Inode,
        entries: Vec<VirtualEntry>,
    ) -> Arc<[VirtualEntry]> {
        let mut c = self.listings.lock();
        if let Some(l) = c.get(&i.ino)
            && **l == *entries
        {
            return l.clone();
        }
        if c.len() >= CACHED && !c.contains_key(&i.ino) {
            c.clear();
        }
        let l: Arc<[VirtualEntry]> = entries.into();
        c.insert(i.ino, l.clone());
        l
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
                        "handles": self.budget.report(),
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
