//! Record types stored in sled.

use crate::types::{Bytes, DeviceId, Name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the on-disk schema.
pub const SCHEMA_VERSION: u32 = 1;

pub use crate::types::{DeviceKind, DeviceState};

/// One device record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Stable identity of this image or snapshot (the key).
    pub id: DeviceId,
    /// Backend device holding the blocks (differs from `id` after a rollback).
    pub dev: DeviceId,
    /// Image name, or snapshot name within its image.
    pub name: Name,
    /// Image or snapshot.
    pub kind: DeviceKind,
    /// Snapshot: its image. Clone: the snapshot it came from. Plain image: none.
    pub parent: Option<DeviceId>,
    /// Virtual size.
    pub size: Bytes,
    /// Filesystem inside (ext4).
    pub fs: String,
    /// Persistent state.
    pub state: DeviceState,
    /// Second backend device during a rollback.
    #[serde(default)]
    pub pending_dev: Option<DeviceId>,
    /// Why the device is faulty.
    #[serde(default)]
    pub error: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Pool transaction id at creation: orders snapshots exactly.
    #[serde(default)]
    pub seq: u64,
    /// User labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// containerd's key and kind, for a [`DeviceKind::Containerd`] device.
    #[serde(default)]
    pub containerd: Option<crate::types::ContainerdInfo>,
}

impl DeviceRecord {
    /// Name for messages, escaped: `image@snap` for a snapshot whose image
    /// record `image` the caller looked up, else the plain name (or
    /// `?@snap` when the image is unknown). Engine code has
    /// `Engine::log_name`, which looks the image up itself.
    pub fn display_name_in(&self, image: Option<&DeviceRecord>) -> String {
        let n = match (self.kind, image) {
            (DeviceKind::Snapshot, Some(i)) => format!("{}@{}", i.name, self.name),
            (DeviceKind::Snapshot, None) => format!("?@{}", self.name),
            _ => self.name.to_string(),
        };
        crate::types::escape(&n).into_owned()
    }

    /// The image record of a snapshot is needed for [`Self::display_name_in`].
    pub fn image_of(&self) -> Option<DeviceId> {
        match self.kind {
            DeviceKind::Snapshot => self.parent,
            DeviceKind::Image | DeviceKind::Containerd => None,
        }
    }
}

/// The pool record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// Schema version.
    pub schema: u32,
    /// Backend kind (`reflink`, `dm`).
    pub backend: String,
    /// Pool size in bytes.
    pub size: Bytes,
    /// Reserve below which new devices are refused.
    pub reserve: Bytes,
    /// Default image size.
    pub default_image_size: Bytes,
    /// Incremented by every metadata change.
    pub transaction_id: u64,
}
