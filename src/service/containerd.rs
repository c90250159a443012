//! containerd's snapshotter requests: the rights rule and the calls into
//! the engine's [`Layers`].
//!
//! The right to change containerd's snapshots is the snapshotter socket
//! itself (owned by root, mode 0600): only the gRPC front end holds a
//! [`Snapshotter`]. No other front end can reach these devices: they live
//! in a name space of their own, so users' verbs (destroy, rename,
//! rollback, label, ...) never resolve to them.

use crate::engine::Engine;
use crate::engine::containerd::{LayerInfo, LayerMount, Layers};
use crate::error::Result;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The snapshotter service over one engine (one per daemon).
pub struct Snapshotter {
    layers: Layers,
}

impl Snapshotter {
    /// The service for the snapshotter socket.
    pub fn new(engine: Arc<Engine>) -> Snapshotter {
        Snapshotter {
            layers: Layers::new(engine),
        }
    }

    /// Prepare: a writable snapshot, empty or a clone of `parent`.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<LayerMount> {
        self.layers.prepare(key, parent, labels, false)
    }

    /// View: a read-only snapshot of `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<LayerMount> {
        self.layers.prepare(key, parent, labels, true)
    }

    /// Mounts of an active or view snapshot.
    pub fn mounts(&self, key: &str) -> Result<LayerMount> {
        self.layers.mounts(key)
    }

    /// Commit active `key` as `name`.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        self.layers.commit(name, key, labels)
    }

    /// Remove `key` (refused while it has children).
    pub fn remove(&self, key: &str) -> Result<()> {
        self.layers.remove(key)
    }

    /// Snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<LayerInfo> {
        self.layers.describe(&self.layers.get(key)?)
    }

    /// Change the labels of `key`.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: Option<&[String]>,
    ) -> Result<LayerInfo> {
        self.layers
            .describe(&self.layers.update(key, labels, fields)?)
    }

    /// Exclusive bytes of `key`.
    pub fn usage(&self, key: &str) -> Result<u64> {
        self.layers.usage(key)
    }

    /// Every containerd snapshot (never users' images).
    pub fn list(&self) -> Result<Vec<LayerInfo>> {
        self.layers
            .all()?
            .iter()
            .map(|r| self.layers.describe(r))
            .collect()
    }

    /// Cleanup: detach what is gone, finish deletions.
    pub fn cleanup(&self) -> Result<()> {
        self.layers.cleanup()
    }

    /// Detach every device (shutdown).
    pub fn detach_all(&self) {
        self.layers.detach_all()
    }
}
