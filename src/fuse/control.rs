//! Content of the read-only inspection files in `.thinfs/`.

use super::Core;
use super::inode::ControlFile;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out =
        serde_json::to_vec_pretty(v).map_err(|e| Error::Corrupt(format!("encode json: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

impl Core {
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
            ControlFile::DevicesJson => json(&self.engine.list_info(true)?),
            ControlFile::Tree => Ok(self.engine.tree_text()?.into_bytes()),
            ControlFile::Info(id) => json(&self.engine.info(&self.engine.record(id)?, true)?),
        }
    }
}
