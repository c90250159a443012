//! The control protocol: one JSON object per line each way over a unix
//! socket. Version 1.
//!
//! Request:  `{"v":1,"op":"list","kind":"all"}`
//! Response: `{"v":1,"ok":true,"data":...}` or
//!           `{"v":1,"ok":false,"error":"not found: ...","errno":2}`

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;

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
            Op::List { .. } | Op::Tree | Op::Info { .. } | Op::Usage | Op::Pool
        )
    }
}

/// One response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version of the daemon.
    pub v: u32,
    /// Success?
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
