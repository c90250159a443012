//! containerd's snapshots: the engine side of the snapshotter front end.
//!
//! Each containerd snapshot is one device of kind
//! [`DeviceKind::Containerd`], named `ctd-<id>` in a name space of its own
//! (users' names cannot reach it), with containerd's key and kind in its
//! record ([`ContainerdInfo`]). Its parent is the committed snapshot it was
//! cloned from, so the child index answers "has children".
//!
//! containerd mounts the block device itself (ext4), so the device must
//! have exactly one user: the engine never mounts these devices, and
//! [`Layers`] keeps one activation of each active or view snapshot attached
//! from Prepare/View until Commit or Remove (re-attached on demand after a
//! daemon restart, when containerd asks for its mounts again). Those
//! devices live in the engine ([`LayerDevices`]) so that the space guard
//! caps the ext4 containerd mounts on the writable ones, as it does for
//! images.
//!
//! Calls run concurrently: each takes only the keys it touches (its own,
//! the parent of a Prepare, the new name of a Commit), so a Remove of the
//! parent waits for a Prepare on it, and disk work on different keys
//! overlaps. Cleanup alone excludes every other call.
//!
//! Crash safety, as for every creation (see `create.rs`): Prepare/View
//! write a `Creating` intent, make the device (mkfs, or a clone of the
//! committed parent), then mark it `Ready`; recovery removes a `Creating`
//! record and its device. Commit and Update are one transaction each (no
//! data moves: the active device *becomes* the committed one). Remove is
//! one transaction (record gone, device queued in `gc`), then the delete.

use super::{Engine, failpoint, now_secs};
use crate::backend::ActiveDevice;
use crate::error::{Error, Result};
use crate::meta::{DeviceKind, DeviceRecord, DeviceState};
use crate::sys::mount;
use crate::types::{Bytes, ContainerdInfo, ContainerdKind, DeviceId, Name};
use crate::types::{MAX_SHOWN, cut, escape};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// The block device containerd mounts for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMount {
    /// The attached block device.
    pub source: PathBuf,
    /// Filesystem type (`ext4`).
    pub fs: String,
    /// Mount options (`ro` for a view).
    pub options: Vec<String>,
}

/// The options containerd mounts a device with: `ro` for a view, and for
/// an ext4 thinfs's own `errors=` (see [`mount::EXT4_ERRORS`]), so that a
/// layer's superblock cannot choose `errors=panic` for the host. No
/// `nosuid,nodev`: a container's root file system must run its setuid
/// programs, and containerd's runtime makes the container's `/dev`.
pub fn layer_options(fs: &str, ro: bool) -> Vec<String> {
    let mut o = Vec::new();
    if ro {
        o.push("ro".to_string());
    }
    if fs == "ext4" {
        o.push(format!("errors={}", mount::EXT4_ERRORS));
    }
    o
}

/// One containerd snapshot as its front end shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// containerd's key (active, view) or name (committed).
    pub key: String,
    /// Active, view or committed.
    pub kind: ContainerdKind,
    /// The committed parent's key; empty for none.
    pub parent: String,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Last change, seconds since the epoch.
    pub updated: u64,
}

/// The devices the engine keeps attached for containerd, by record id: one
/// activation per active or view snapshot (or, after a restart, the path
/// of the one a crashed daemon left attached under containerd's mount).
/// The space guard reads the writable ones.
#[derive(Debug, Default)]
pub(super) struct LayerDevices {
    held: Mutex<HashMap<DeviceId, Held>>,
}

#[derive(Debug)]
struct Held {
    /// Our activation; None for one a crashed daemon left attached.
    _active: Option<Box<dyn ActiveDevice>>,
    path: PathBuf,
    dev: DeviceId,
    writable: bool,
}

/// A writable device of containerd's (an active snapshot), which
/// containerd may have mounted.
#[derive(Debug, Clone)]
pub(super) struct LayerWritable {
    /// Record id.
    pub id: DeviceId,
    /// Backend device.
    pub dev: DeviceId,
    /// The attached block device.
    pub path: PathBuf,
}

impl Engine {
    /// containerd's writable devices, attached now.
    pub(super) fn layer_writables(&self) -> Vec<LayerWritable> {
        self.layer_devices
            .held
            .lock()
            .iter()
            .filter(|(_, h)| h.writable)
            .map(|(id, h)| LayerWritable {
                id: *id,
                dev: h.dev,
                path: h.path.clone(),
            })
            .collect()
    }
}

/// The keys calls are working on: a call waits only for calls on the same
/// keys (its own, its parent's, a commit's new name), never for others,
/// so disk work (mkfs, clone, attach, delete) of different keys overlaps.
#[derive(Default)]
struct KeyLocks {
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    keys: Vec<String>,
}

impl KeyLocks {
    /// Take every key of `keys` (empty ones are skipped), all at once.
    fn lock(&self, keys: &[&str]) -> KeyGuard<'_> {
        let keys: Vec<String> = keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| k.to_string())
            .collect();
        let mut busy = self.busy.lock();
        while keys.iter().any(|k| busy.contains(k)) {
            self.freed.wait(&mut busy);
        }
        busy.extend(keys.iter().cloned());
        KeyGuard { locks: self, keys }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock();
        for k in &self.keys {
            busy.remove(k);
        }
        self.locks.freed.notify_all();
    }
}

/// containerd's snapshots over one engine.
pub struct Layers {
    engine: Arc<Engine>,
    /// Keys with a call under way.
    keys: KeyLocks,
    /// Calls share it; Cleanup (which drops attachments of snapshots that
    /// are gone) takes it alone, so it never races a Prepare's attach.
    gate: RwLock<()>,
}

impl Layers {
    /// containerd's snapshots in `engine`. Devices a crashed daemon left
    /// attached (mounted by running containers) are taken back, so that
    /// the space guard watches them again.
    pub fn new(engine: Arc<Engine>) -> Layers {
        let l = Layers {
            engine,
            keys: KeyLocks::default(),
            gate: RwLock::new(()),
        };
        match l.all() {
            Ok(all) => {
                for r in all {
                    let Ok(c) = info(&r) else { continue };
                    if c.kind == ContainerdKind::Committed {
                        continue;
                    }
                    if let Some(path) = l.engine.backend.live_attachment(r.dev) {
                        log::info!(
                            "containerd: {} ({}) is still attached at {}",
                            r.name,
                            escape(&cut(&c.key, MAX_SHOWN)),
                            path.display()
                        );
                        l.hold(&r, None, path, c.kind == ContainerdKind::Active);
                    }
                }
            }
            Err(e) => log::warn!("containerd: cannot list snapshots at start: {e}"),
        }
        l
    }

    fn hold(
        &self,
        r: &DeviceRecord,
        active: Option<Box<dyn ActiveDevice>>,
        path: PathBuf,
        writable: bool,
    ) {
        self.engine.layer_devices.held.lock().insert(
            r.id,
            Held {
                _active: active,
                path,
                dev: r.dev,
                writable,
            },
        );
    }

    fn release(&self, id: DeviceId) {
        self.engine.layer_devices.held.lock().remove(&id);
    }

    /// Every containerd snapshot that is complete (`Ready` or `Faulty`).
    pub fn all(&self) -> Result<Vec<DeviceRecord>> {
        Ok(self
            .engine
            .meta
            .list()?
            .into_iter()
            .filter(|r| r.kind == DeviceKind::Containerd && r.state != DeviceState::Creating)
            .collect())
    }

    /// The snapshot with containerd key `key`.
    pub fn find(&self, key: &str) -> Result<Option<DeviceRecord>> {
        let meta = &self.engine.meta;
        let Some(id) = meta.containerd_id(key)? else {
            return Ok(None);
        };
        Ok(meta.get(id)?.filter(|r| {
            r.kind == DeviceKind::Containerd
                && r.state != DeviceState::Creating
                && r.containerd.as_ref().is_some_and(|c| c.key == key)
        }))
    }

    /// The snapshot with key `key`, or NotFound.
    pub fn get(&self, key: &str) -> Result<DeviceRecord> {
        self.find(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))
    }

    /// containerd's key of the record `id` (a parent), if it is one of its.
    fn key_of(&self, id: DeviceId) -> Result<Option<String>> {
        Ok(self
            .engine
            .meta
            .get(id)?
            .and_then(|r| r.containerd.map(|c| c.key)))
    }

    /// The record as containerd sees it.
    pub fn describe(&self, r: &DeviceRecord) -> Result<LayerInfo> {
        let c = info(r)?;
        let parent = match r.parent {
            Some(p) => self.key_of(p)?.unwrap_or_default(),
            None => String::new(),
        };
        Ok(LayerInfo {
            key: c.key.clone(),
            kind: c.kind,
            parent,
            labels: r.labels.clone(),
            created: r.created,
            updated: c.updated.max(r.created),
        })
    }

    /// Prepare (`view` false) or View (`view` true) snapshot `key` on top
    /// of committed `parent` (empty: a new filesystem).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        view: bool,
    ) -> Result<LayerMount> {
        let _gate = self.gate.read();
        let _keys = self.keys.lock(&[key, parent]);
        if key.is_empty() {
            return Err(Error::Invalid("empty snapshot key".into()));
        }
        if self.find(key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key}")));
        }
        let e = &self.engine;
        let parent = if parent.is_empty() {
            None
        } else {
            let p = self.get(parent)?;
            if info(&p)?.kind != ContainerdKind::Committed {
                return Err(Error::Invalid(format!("parent {parent} is not committed")));
            }
            Some(e.ready(p.id)?)
        };
        if let Err(err) = e.check_reserve(&format!("prepare snapshot {key}")) {
            log::warn!(
                "containerd: refused {} {}: {err}",
                if view { "view" } else { "prepare" },
                escape(&cut(key, MAX_SHOWN))
            );
            return Err(err);
        }
        let kind = if view {
            ContainerdKind::View
        } else {
            ContainerdKind::Active
        };
        let size = parent
            .as_ref()
            .map(|p| p.size)
            .unwrap_or(e.config.default_image_size);
        let rec = self.intent(key, kind, parent.as_ref().map(|p| p.id), size, labels)?;
        failpoint("containerd.intent");
        let made = match &parent {
            Some(p) => e.backend.snapshot(p.dev, rec.dev),
            None => e.backend.create(rec.dev, size).and_then(|_| e.mkfs(&rec)),
        };
        if let Err(err) = made {
            return Err(e.undo_creation(&rec, err));
        }
        failpoint("containerd.backend");
        let mut rec = rec;
        rec.state = DeviceState::Ready;
        e.meta.txn(|t| t.put(&rec))?;
        failpoint("containerd.done");
        self.attach(&rec)
    }

    fn intent(
        &self,
        key: &str,
        kind: ContainerdKind,
        parent: Option<DeviceId>,
        size: Bytes,
        labels: BTreeMap<String, String>,
    ) -> Result<DeviceRecord> {
        let e = &self.engine;
        let _g = e.alloc.lock();
        let dev = e.alloc_dev()?;
        let seq = e.meta.pool()?.map(|p| p.transaction_id + 1).unwrap_or(0);
        let now = now_secs();
        let rec = DeviceRecord {
            id: dev,
            dev,
            name: Name::new(&format!("ctd-{dev}"))?,
            kind: DeviceKind::Containerd,
            parent,
            size,
            fs: super::create::DEFAULT_FS.into(),
            state: DeviceState::Creating,
            pending_dev: None,
            error: None,
            created: now,
            seq,
            labels,
            identity: None,
            containerd: Some(ContainerdInfo {
                key: key.to_string(),
                kind,
                updated: now,
            }),
        };
        e.meta.txn(|t| t.put(&rec))?;
        Ok(rec)
    }

    /// The attached device of an active or view snapshot (attached again
    /// if the daemon restarted since Prepare).
    fn attach(&self, rec: &DeviceRecord) -> Result<LayerMount> {
        let c = info(rec)?;
        let ro = match c.kind {
            ContainerdKind::Active => false,
            ContainerdKind::View => true,
            ContainerdKind::Committed => {
                return Err(Error::Invalid(format!(
                    "snapshot {} is committed: it has no mounts",
                    c.key
                )));
            }
        };
        let held = self
            .engine
            .layer_devices
            .held
            .lock()
            .get(&rec.id)
            .map(|h| h.path.clone());
        // The caller holds the key: nobody attaches this device meanwhile.
        let source = match held {
            Some(p) => p,
            // Attached before a crash of the daemon and still mounted by
            // containerd: the same device again, never a second one (one
            // superblock per device). It lives as long as that mount.
            None if let Some(p) = self.engine.backend.live_attachment(rec.dev) => {
                self.hold(rec, None, p.clone(), !ro);
                p
            }
            None => {
                let a = self.engine.backend.activate(rec.dev, rec.size, ro)?;
                let p = a.path().to_path_buf();
                self.hold(rec, Some(a), p.clone(), !ro);
                p
            }
        };
        Ok(LayerMount {
            source,
            fs: rec.fs.clone(),
            options: layer_options(&rec.fs, ro),
        })
    }

    /// Mounts of snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<LayerMount> {
        let _gate = self.gate.read();
        let _keys = self.keys.lock(&[key]);
        let rec = self.get(key)?;
        self.engine.ready(rec.id)?;
        self.attach(&rec)
    }

    /// Commit active snapshot `key` as `name`: the same device, now
    /// committed (read-only from here on) and detached.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let _gate = self.gate.read();
        let _keys = self.keys.lock(&[key, name]);
        let rec = self.get(key)?;
        let mut rec = self.engine.ready(rec.id)?;
        if info(&rec)?.kind != ContainerdKind::Active {
            return Err(Error::Invalid(format!("snapshot {key} is not active")));
        }
        if self.find(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name}")));
        }
        // containerd has unmounted it; our activation goes first, so that
        // clones of it are taken of a device nobody writes to.
        self.release(rec.id);
        let now = now_secs();
        rec.containerd = Some(ContainerdInfo {
            key: name.to_string(),
            kind: ContainerdKind::Committed,
            updated: now,
        });
        rec.labels.extend(labels);
        self.engine.meta.txn(|t| t.put(&rec))?;
        failpoint("containerd.commit");
        Ok(())
    }

    /// Remove snapshot `key`; refused while it has children.
    pub fn remove(&self, key: &str) -> Result<()> {
        let _gate = self.gate.read();
        let _keys = self.keys.lock(&[key]);
        let rec = self.get(key)?;
        let kids = self.engine.meta.children(rec.id)?;
        if !kids.is_empty() {
            return Err(Error::NotEmpty(format!(
                "snapshot {key} has {} child snapshot(s)",
                kids.len()
            )));
        }
        self.release(rec.id);
        self.engine.meta.txn(|t| {
            t.remove(rec.id)?;
            t.gc_add(rec.dev)
        })?;
        failpoint("containerd.remove");
        self.engine.collect_garbage()
    }

    /// Replace the labels of `key` (all of them, or those named
    /// `labels.NAME` in `fields`).
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: Option<&[String]>,
    ) -> Result<DeviceRecord> {
        let _gate = self.gate.read();
        let _keys = self.keys.lock(&[key]);
        let mut rec = self.get(key)?;
        match fields {
            None | Some([]) => rec.labels = labels,
            Some(f) => {
                for p in f {
                    if p == "labels" {
                        rec.labels = labels.clone();
                    } else if let Some(k) = p.strip_prefix("labels.") {
                        match labels.get(k) {
                            Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                            None => rec.labels.remove(k),
                        };
                    } else {
                        return Err(Error::Invalid(format!("cannot update field {p}")));
                    }
                }
            }
        }
        if let Some(c) = rec.containerd.as_mut() {
            c.updated = now_secs();
        }
        self.engine.meta.txn(|t| t.put(&rec))?;
        Ok(rec)
    }

    /// Bytes held by `key` alone.
    pub fn usage(&self, key: &str) -> Result<u64> {
        let rec = self.get(key)?;
        Ok(self.engine.backend.usage(rec.dev)?.exclusive)
    }

    /// Let go of attachments whose snapshot is gone, finish pending
    /// deletions, and give space back.
    pub fn cleanup(&self) -> Result<()> {
        let _gate = self.gate.write();
        let live: HashSet<DeviceId> = self.all()?.iter().map(|r| r.id).collect();
        self.engine
            .layer_devices
            .held
            .lock()
            .retain(|id, _| live.contains(id));
        self.engine.collect_garbage()
    }

    /// Detach every device (daemon shutdown).
    pub fn detach_all(&self) {
        self.engine.layer_devices.held.lock().clear();
    }
}

/// The containerd part of a containerd record.
pub fn info(r: &DeviceRecord) -> Result<&ContainerdInfo> {
    r.containerd
        .as_ref()
        .ok_or_else(|| Error::Corrupt(format!("device {} has no containerd key", r.id)))
}

impl Engine {
    /// Undo a creation that failed after its intent was written (the
    /// record goes, the device is deleted; recovery finishes it if this
    /// fails too).
    fn undo_creation(&self, rec: &DeviceRecord, e: Error) -> Error {
        log::error!("creating {} failed, rolling back: {e}", rec.name);
        let cleaned = self.meta.txn(|t| {
            t.remove(rec.id)?;
            t.gc_add(rec.dev)
        });
        if let Err(c) = cleaned.and_then(|_| self.collect_garbage()) {
            log::error!(
                "rollback of {} incomplete ({c}); the next open finishes it",
                rec.name
            );
        }
        e
    }
}

impl Engine {
    /// The id of containerd's committed layer named `name` (`ctd-N`, as
    /// `thinfs list -t all` shows it): users may snapshot it, nothing more.
    pub(super) fn layer_id(&self, name: &Name) -> Result<DeviceId> {
        let nf = || Error::NotFound(format!("no image named {name}"));
        let n: u32 = name
            .as_str()
            .strip_prefix("ctd-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(nf)?;
        let r = self.meta.get(DeviceId::new(n)?)?.ok_or_else(nf)?;
        if r.kind != DeviceKind::Containerd || r.name != *name {
            return Err(nf());
        }
        Ok(r.id)
    }

    /// What `thinfs snapshot NAME@SNAP` snapshots: image `name`, or
    /// containerd's committed layer `name`.
    pub fn snapshot_origin(&self, name: &Name) -> Result<DeviceRecord> {
        match self.meta.image_id(name)? {
            Some(id) => self.record(id),
            None => self.record(self.layer_id(name)?),
        }
    }

    /// A user may snapshot a containerd layer only once it is committed
    /// (read-only for good); active and view snapshots are containerd's
    /// alone (it has them mounted).
    pub(super) fn check_layer_snapshot(&self, r: &DeviceRecord) -> Result<()> {
        let c = info(r)?;
        if c.kind != ContainerdKind::Committed {
            return Err(Error::PermissionDenied(format!(
                "{} is containerd's {:?} snapshot; only committed layers can be snapshotted",
                r.name, c.kind
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::layer_options;

    #[test]
    fn layer_mounts_take_thinfs_errors_option() {
        assert_eq!(layer_options("ext4", false), ["errors=remount-ro"]);
        assert_eq!(layer_options("ext4", true), ["ro", "errors=remount-ro"]);
        assert_eq!(layer_options("xfs", true), ["ro"]);
    }
}
