//! The control protocol: one JSON object per line each way over a unix
//! socket. Version 2.
//!
//! Request:  `{"v":2,"op":"list","kind":"all"}`
//! Response: `{"v":2,"ok":true,"data":...}` or
//!           `{"v":2,"ok":false,"error":"not found: ...","errno":2}`
//!
//! A streaming request ([`Op::fds`] > 0, e.g. `export`) carries its
//! descriptors (SCM_RIGHTS) on the bytes of its request line; the daemon
//! answers with zero or more progress lines
//! `{"v":2,"progress":{"done":N,"total":M}}` and then one response line.
//! The client cancels by closing the connection (or sending `{"cancel":true}`).
//! A request of another version gets one error line naming both versions.
//! Version 2 added streaming and `export`; requests of version 1 are
//! otherwise the same.

use crate::engine::DeviceInfo;
use crate::types::{DeviceKind, DeviceState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Protocol version spoken by this build.
pub const VERSION: u32 = 2;

/// The error line for a request of protocol `client` (not [`VERSION`]).
pub fn version_mismatch(client: u64) -> String {
    if client < u64::from(VERSION) {
        format!(
            "thinfs CLI speaks protocol {client}, daemon speaks {VERSION}: upgrade the CLI \
             (use the thinfs binary of the running daemon)"
        )
    } else {
        format!(
            "thinfs CLI speaks protocol {client}, daemon speaks {VERSION}: the daemon is older \
             than the CLI; restart it with the new thinfs"
        )
    }
}

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/thinfs/thinfs.sock";

/// One request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version of the client.
    pub v: u32,
    /// The operation.
    #[serde(flatten)]
    pub op: Op,
}

/// Operations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Devices, with usage.
    List {
        /// `image`, `snapshot` or `all`.
        kind: String,
    },
    /// The graph as text.
    Tree,
    /// One device.
    Info {
        /// `NAME` or `NAME@SNAP`.
        target: String,
    },
    /// Usage of every device.
    Usage,
    /// Pool status.
    Pool,
    /// New empty image.
    Create {
        /// Image name.
        name: String,
        /// Size (`10G`); default from the mount.
        size: Option<String>,
    },
    /// Snapshot `NAME@SNAP`.
    Snapshot {
        /// `NAME@SNAP`.
        target: String,
    },
    /// Writable image from a snapshot.
    Clone {
        /// `NAME@SNAP`.
        source: String,
        /// New image name.
        name: String,
    },
    /// Image back to a snapshot.
    Rollback {
        /// `NAME@SNAP`.
        target: String,
        /// Destroy snapshots newer than the target.
        destroy_newer: bool,
    },
    /// Destroy an image or snapshot.
    Destroy {
        /// `NAME` or `NAME@SNAP`.
        target: String,
        /// Also the image's snapshots.
        recursive: bool,
    },
    /// Rename an image or snapshot.
    Rename {
        /// `NAME` or `NAME@SNAP`.
        from: String,
        /// New name (`NEW`, or `NAME@NEW` for a snapshot).
        to: String,
    },
    /// Grow an image.
    Resize {
        /// Image name.
        name: String,
        /// New size.
        size: String,
    },
    /// Check and repair a filesystem (unmounts it first).
    Fsck {
        /// `NAME` or `NAME@SNAP`.
        target: String,
    },
    /// Set or remove a label.
    Label {
        /// `NAME` or `NAME@SNAP`.
        target: String,
        /// Label key.
        key: String,
        /// Value; none removes the label.
        value: Option<String>,
    },
    /// Streaming, one descriptor (the output): a tarball of an image or
    /// snapshot.
    Export(crate::service::ExportRequest),
    /// Streaming, one descriptor (the output): a snapshot stream.
    Send(crate::service::SendRequest),
    /// Streaming, one descriptor (the input): receive a snapshot stream.
    Receive(crate::service::ReceiveRequest),
    /// Partial receives kept by `receive -s`, with their resume tokens
    /// (`list` and `info` show them).
    Partials,
    /// An image's snapshots with their identities (`send --haves`).
    Haves {
        /// Image name.
        image: String,
    },
    /// Streaming, one descriptor (the input): a new image from a tar
    /// stream, ending with its snapshot `NAME@import` (root only).
    Import(crate::service::ImportRequest),
    /// Streaming, one descriptor (the output): a backup file of an image.
    Backup(crate::service::BackupRequest),
    /// Streaming, one descriptor (the backup file): restore (root only).
    Restore(crate::service::RestoreRequest),
}

impl Op {
    /// The operation for a log line: every string cut to a few dozen bytes
    /// and escaped, so that a 64 KiB name costs one short line.
    pub fn summary(&self) -> String {
        fn shorten(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::String(s) => {
                    *s = crate::types::escape(&crate::types::cut(s, crate::types::MAX_SHOWN))
                        .into_owned()
                }
                serde_json::Value::Object(m) => m.values_mut().for_each(shorten),
                serde_json::Value::Array(a) => a.iter_mut().for_each(shorten),
                _ => {}
            }
        }
        let mut v = serde_json::to_value(self).unwrap_or_default();
        shorten(&mut v);
        v.to_string()
    }

    /// Does this operation change anything?
    pub fn is_change(&self) -> bool {
        !matches!(
            self,
            Op::List { .. }
                | Op::Tree
                | Op::Info { .. }
                | Op::Usage
                | Op::Pool
                | Op::Export(_)
                | Op::Send(_)
                | Op::Haves { .. }
                | Op::Partials
        )
    }

    /// Descriptors that come with the request; more than 0 makes it a
    /// streaming request (progress lines, cancelled when the client goes).
    pub fn fds(&self) -> usize {
        match self {
            Op::Export(_)
            | Op::Send(_)
            | Op::Receive(_)
            | Op::Import(_)
            | Op::Backup(_)
            | Op::Restore(_) => 1,
            _ => 0,
        }
    }
}

/// Progress of a streaming request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// A line the client sends while a streaming request runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientLine {
    /// Stop the operation and undo it.
    #[serde(default)]
    pub cancel: bool,
}

/// One response line (or, with `progress`, one progress line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version of the daemon.
    pub v: u32,
    /// Progress of a streaming request: not the final line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Success?
    #[serde(default)]
    pub ok: bool,
    /// Result data on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Message on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// errno on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

/// Space used by one device, as `list`, `info` and `usage` print it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct UsageView {
    /// Bytes mapped (allocated) in the device.
    pub mapped: u64,
    /// Bytes mapped and shared with no other device.
    pub exclusive: u64,
    /// Number of extents (reflink) or mappings.
    pub extents: u64,
}

/// One device as `list --json`, `info --json`, `tree --json` and
/// `usage --json` print it: the documented, stable JSON (README "JSON
/// (stable)"). Fields may be added; none is renamed or removed. It is
/// made from the engine's view, not from the stored record, so that a
/// change of the record's layout cannot change the CLI's output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    /// `image` or `image@snap`.
    pub full_name: String,
    /// Stable id.
    pub id: u32,
    /// Backend device holding the blocks.
    pub dev: u32,
    /// Image name, or snapshot name within its image.
    pub name: String,
    /// `image` or `snapshot`.
    pub kind: DeviceKind,
    /// Id of the parent (a snapshot's image, a clone's snapshot).
    pub parent: Option<u32>,
    /// Full name of the parent.
    pub parent_name: Option<String>,
    /// Full names of the children.
    pub children: Vec<String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Filesystem inside.
    pub fs: String,
    /// `creating`, `ready`, `rollingback` or `faulty`.
    pub state: DeviceState,
    /// Why the device is faulty.
    pub error: Option<String>,
    /// Second backend device during a rollback.
    pub pending_dev: Option<u32>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Pool transaction id at creation.
    pub seq: u64,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Space used, when asked for and known.
    pub usage: Option<UsageView>,
    /// Mounted underneath right now.
    pub mounted: bool,
    /// A snapshot's identity (32 hex digits): the same identity means the
    /// same bytes, on any pool (`send`/`receive` keep it). Null for an
    /// image.
    #[serde(default)]
    pub identity: Option<String>,
    /// containerd's key and kind, for a containerd layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containerd: Option<crate::types::ContainerdInfo>,
}

impl From<&DeviceInfo> for DeviceView {
    fn from(d: &DeviceInfo) -> DeviceView {
        let r = &d.record;
        DeviceView {
            full_name: d.full_name.clone(),
            id: r.id.get(),
            dev: r.dev.get(),
            name: r.name.to_string(),
            kind: r.kind,
            parent: r.parent.map(|p| p.get()),
            parent_name: d.parent_name.clone(),
            children: d.children.clone(),
            size: r.size.0,
            fs: r.fs.clone(),
            state: r.state,
            error: r.error.clone(),
            pending_dev: r.pending_dev.map(|p| p.get()),
            created: r.created,
            seq: r.seq,
            labels: r.labels.clone(),
            usage: d.usage.map(|u| UsageView {
                mapped: u.mapped,
                exclusive: u.exclusive,
                extents: u.extents,
            }),
            mounted: d.mounted,
            identity: r.identity.map(|i| i.to_string()),
            containerd: r.containerd.clone(),
        }
    }
}
