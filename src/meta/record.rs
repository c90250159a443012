//! Record types stored in sled.

use crate::types::{Bytes, DeviceId, Name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the on-disk schema.
/// 2: snapshots carry an [`Identity`] (older snapshots get one at open).
pub const SCHEMA_VERSION: u32 = 2;

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
    /// Snapshot: its stable 128-bit identity, given when it is made and
    /// kept by `receive` (the same identity means the same bytes). Images
    /// have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
}

/// A snapshot's stable 128-bit identity, shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(pub [u8; 16]);

impl Identity {
    /// A new random identity (from the kernel's random pool).
    pub fn random() -> Result<Identity, std::io::Error> {
        use std::io::Read;
        let mut b = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(Identity(b))
    }

    /// Parse 32 hex digits.
    pub fn parse(s: &str) -> Option<Identity> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Identity(b))
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Identity, D::Error> {
        let s = String::deserialize(d)?;
        Identity::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad identity {s:?}")))
    }
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

/// A receive kept with `receive -s` after it was interrupted: its device
/// (every stream range below `offset` is on it and synced, up to a
/// checkpoint the stream's digest verified), and what the stream was.
/// Shown by `list` and `info`; resumed by a `send -t TOKEN` stream,
/// dropped by `receive -A NAME`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialRecord {
    /// The NAME of `receive NAME` (the key).
    pub name: Name,
    /// The backend device being written (no device record shows it).
    pub dev: DeviceId,
    /// The snapshot's name in the stream.
    pub snap_name: String,
    /// The snapshot's identity.
    pub snap_id: Identity,
    /// The base's identity (incremental streams).
    pub base_id: Option<Identity>,
    /// Device size of the stream.
    pub size: Bytes,
    /// Every range below this offset is received, verified and synced.
    pub offset: u64,
    /// The stream was compressed (a resume asks for the same).
    pub compressed: bool,
    /// When the receive started, seconds since the epoch.
    pub created: u64,
}
