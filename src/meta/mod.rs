//! The metadata store: sled trees, their key encodings and transactions.
//!
//! Trees:
//! - `devices`: device id (4 bytes, big-endian) -> [`DeviceRecord`] (JSON)
//! - `names`:   `i` + image name, or `s` + image id + snapshot name -> id;
//!   `c` + name of one of containerd's devices (`ctd-N`) -> id; `k` +
//!   containerd's key of it -> id (so a call by key reads one record, not
//!   all of them; rebuilt from the records at every open)
//! - `children`: parent id + child id -> empty
//! - `gc`:      backend device id -> empty: devices whose record is gone
//!   and whose blocks must still be freed (finished at the next open)
//! - `pool`:    `pool` -> [`PoolRecord`] (JSON)
//! - `receiving`: backend device id -> empty: hidden devices a `receive`
//!   is writing; no record shows them. Opening the store moves them to
//!   `gc` (a receive never outlives its process), so a crash leaves nothing.
//! - `partial`: image name -> [`PartialRecord`] (JSON): receives kept with
//!   `receive -s`; their devices survive a restart (they are resumed or
//!   abandoned by request, never swept).
//!
//! Every change goes through [`Meta::txn`]: one sled transaction over all
//! trees that keeps the indexes in step with the records and bumps the
//! pool's transaction id. This module knows nothing of backends or mounts.

mod record;

pub use record::{
    DeviceKind, DeviceRecord, DeviceState, Identity, PartialRecord, PoolRecord, SCHEMA_VERSION,
};

use crate::error::{Error, Result};
use crate::types::{DeviceId, Name};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use std::collections::BTreeSet;
use std::path::Path;

/// Called with the new transaction id after every committed change.
pub type CommitHook = Box<dyn Fn(u64) + Send + Sync>;

/// The open metadata store.
#[derive(Clone)]
pub struct Meta {
    hook: std::sync::Arc<std::sync::OnceLock<CommitHook>>,
    db: sled::Db,
    devices: sled::Tree,
    names: sled::Tree,
    children: sled::Tree,
    gc: sled::Tree,
    pool: sled::Tree,
    receiving: sled::Tree,
    partial: sled::Tree,
}

const POOL_KEY: &[u8] = b"pool";

fn name_key(kind: DeviceKind, image: Option<DeviceId>, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 5);
    match (kind, image) {
        (DeviceKind::Snapshot, Some(img)) => {
            k.push(b's');
            k.extend_from_slice(&img.key());
        }
        // containerd's devices: a namespace of their own, out of users' reach.
        (DeviceKind::Containerd, _) => k.push(b'c'),
        _ => k.push(b'i'),
    }
    k.extend_from_slice(name.as_bytes());
    k
}

/// `k` + containerd's key: the index of containerd's keys in `names`.
fn ctd_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(b'k');
    k.extend_from_slice(key.as_bytes());
    k
}

fn rec_name_key(r: &DeviceRecord) -> Vec<u8> {
    name_key(r.kind, r.parent, r.name.as_str())
}

fn child_key(parent: DeviceId, child: DeviceId) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&parent.key());
    k[4..].copy_from_slice(&child.key());
    k
}

fn decode(v: &[u8]) -> Result<DeviceRecord> {
    serde_json::from_slice(v).map_err(|e| Error::Corrupt(format!("device record: {e}")))
}

/// A record as stored. A record that fails to encode is an error, never
/// empty bytes written in its place.
fn encode<T: serde::Serialize>(r: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(r).map_err(|e| Error::Corrupt(format!("cannot encode a record: {e}")))
}

/// The view of all trees inside one transaction.
pub struct Txn<'a> {
    devices: &'a TransactionalTree,
    names: &'a TransactionalTree,
    children: &'a TransactionalTree,
    gc: &'a TransactionalTree,
    pool: &'a TransactionalTree,
    receiving: &'a TransactionalTree,
    partial: &'a TransactionalTree,
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn abort<T>(e: Error) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

impl Txn<'_> {
    /// The record of `id`, as seen inside this transaction.
    pub fn get(&self, id: DeviceId) -> TxResult<Option<DeviceRecord>> {
        match self.devices.get(id.key())? {
            Some(v) => decode(&v).map(Some).or_else(abort),
            None => Ok(None),
        }
    }

    /// Insert or update a record, keeping the name and child indexes in step.
    /// Fails with `AlreadyExists` if its name is taken by another device.
    pub fn put(&self, rec: &DeviceRecord) -> TxResult<()> {
        let old = self.get(rec.id)?;
        let nk = rec_name_key(rec);
        if let Some(owner) = self.names.get(&nk)?
            && owner.as_ref() != rec.id.key()
        {
            let image = match rec.image_of() {
                Some(i) => self.get(i)?,
                None => None,
            };
            return abort(Error::AlreadyExists(rec.display_name_in(image.as_ref())));
        }
        if let Some(o) = &old {
            let ok = rec_name_key(o);
            if ok != nk {
                self.names.remove(ok)?;
            }
            if let Some(p) = o.parent
                && Some(p) != rec.parent
            {
                self.children.remove(&child_key(p, o.id))?;
            }
        }
        self.names.insert(nk, &rec.id.key())?;
        let ck = rec.containerd.as_ref().map(|c| ctd_key(&c.key));
        if let Some(oc) = old.as_ref().and_then(|o| o.containerd.as_ref()) {
            let ok = ctd_key(&oc.key);
            if Some(&ok) != ck.as_ref() {
                self.drop_ctd_key(&ok, rec.id)?;
            }
        }
        if let Some(k) = ck {
            self.names.insert(k, &rec.id.key())?;
        }
        if let Some(p) = rec.parent {
            self.children.insert(&child_key(p, rec.id), &[])?;
        }
        let bytes = encode(rec).or_else(abort)?;
        self.devices.insert(&rec.id.key(), bytes)?;
        Ok(())
    }

    /// Remove a record and its index entries.
    pub fn remove(&self, id: DeviceId) -> TxResult<Option<DeviceRecord>> {
        let Some(old) = self.get(id)? else {
            return Ok(None);
        };
        self.names.remove(rec_name_key(&old))?;
        if let Some(c) = &old.containerd {
            self.drop_ctd_key(&ctd_key(&c.key), id)?;
        }
        if let Some(p) = old.parent {
            self.children.remove(&child_key(p, id))?;
        }
        self.devices.remove(&id.key())?;
        Ok(Some(old))
    }

    /// Drop containerd's key `k` from the index if it still names `id`.
    fn drop_ctd_key(&self, k: &[u8], id: DeviceId) -> TxResult<()> {
        if self.names.get(k)?.is_some_and(|v| v.as_ref() == id.key()) {
            self.names.remove(k)?;
        }
        Ok(())
    }

    /// Queue a backend device for deletion.
    pub fn gc_add(&self, dev: DeviceId) -> TxResult<()> {
        self.gc.insert(&dev.key(), &[])?;
        Ok(())
    }

    /// Forget a hidden device of a receive (it was published or deleted).
    pub fn receiving_done(&self, dev: DeviceId) -> TxResult<()> {
        self.receiving.remove(&dev.key())?;
        Ok(())
    }

    /// Keep a partial receive (its device leaves `receiving` in the same
    /// transaction, so no restart sweeps it).
    pub fn partial_put(&self, p: &PartialRecord) -> TxResult<()> {
        if let Some(v) = self.partial.get(p.name.as_str().as_bytes())?
            && serde_json::from_slice::<PartialRecord>(&v).map_or(true, |o| o.dev != p.dev)
        {
            return abort(Error::Busy(format!(
                "{} has a partial receive already",
                p.name
            )));
        }
        let bytes = encode(p).or_else(abort)?;
        self.partial.insert(p.name.as_str().as_bytes(), bytes)?;
        self.receiving.remove(&p.dev.key())?;
        Ok(())
    }

    /// Forget the partial receive of `name` (published or abandoned).
    pub fn partial_remove(&self, name: &Name) -> TxResult<()> {
        self.partial.remove(name.as_str().as_bytes())?;
        Ok(())
    }

    /// Bump the pool transaction id.
    pub fn bump(&self) -> TxResult<u64> {
        let mut p: PoolRecord = match self.pool.get(POOL_KEY)? {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| Error::Corrupt(format!("pool record: {e}")))
                .or_else(abort)?,
            None => return abort(Error::Corrupt("pool record missing".into())),
        };
        p.transaction_id += 1;
        let bytes = encode(&p).or_else(abort)?;
        self.pool.insert(POOL_KEY, bytes)?;
        Ok(p.transaction_id)
    }
}

impl Meta {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Meta> {
        // sled releases its file lock from a background thread when the
        // last handle of a store is dropped: a store reopened at once in the
        // same process may find it still held for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                // sled reports the held lock as ErrorKind::Other with the
                // lock's own error (EWOULDBLOCK) only in its message.
                Err(sled::Error::Io(e))
                    if (e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().starts_with("could not acquire lock"))
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r?,
            }
        };
        let m = Meta {
            hook: Default::default(),
            devices: db.open_tree("devices")?,
            names: db.open_tree("names")?,
            children: db.open_tree("children")?,
            gc: db.open_tree("gc")?,
            pool: db.open_tree("pool")?,
            receiving: db.open_tree("receiving")?,
            partial: db.open_tree("partial")?,
            db,
        };
        m.upgrade()?;
        m.drop_receiving()?;
        Ok(m)
    }

    /// Schema 1 -> 2: every snapshot gets an identity. The index of
    /// containerd's keys is rebuilt from the records (a store written
    /// before it existed has none).
    fn upgrade(&self) -> Result<()> {
        for k in self.names.scan_prefix([b'k']).keys() {
            self.names.remove(k?)?;
        }
        for mut r in self.list()? {
            if let Some(c) = &r.containerd {
                self.names.insert(ctd_key(&c.key), &r.id.key())?;
            }
            if r.kind == DeviceKind::Snapshot && r.identity.is_none() {
                r.identity =
                    Some(Identity::random().map_err(|e| Error::io("read /dev/urandom", e))?);
                self.devices.insert(r.id.key(), encode(&r)?)?;
                log::info!(
                    "upgrade: snapshot id {} has identity {:?}",
                    r.id,
                    r.identity
                );
            }
        }
        self.db.flush()?;
        Ok(())
    }

    /// Hidden devices of receives that a crash interrupted go to `gc`.
    fn drop_receiving(&self) -> Result<()> {
        for kv in self.receiving.iter() {
            let (k, _) = kv?;
            log::warn!(
                "recovery: a receive into backend device {} was interrupted; deleting it",
                DeviceId::from_key(&k)?
            );
            self.gc.insert(&k, &[])?;
            self.receiving.remove(&k)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Record a hidden device of a receive, before the backend makes it.
    pub fn receiving_add(&self, dev: DeviceId) -> Result<()> {
        self.receiving.insert(dev.key(), &[])?;
        self.db.flush()?;
        Ok(())
    }

    /// The pool's secret key for resume tokens (32 random bytes, made on
    /// first use and kept in the `pool` tree): a token this pool handed
    /// out carries a keyed blake3 MAC under it, so a changed token is
    /// refused when it comes back.
    pub fn resume_key(&self) -> Result<[u8; 32]> {
        const KEY: &[u8] = b"resume-key";
        if let Some(v) = self.pool.get(KEY)?
            && let Ok(k) = <[u8; 32]>::try_from(&v[..])
        {
            return Ok(k);
        }
        let mut k = [0u8; 32];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom")
                .map_err(|e| Error::io("open /dev/urandom", e))?,
            &mut k,
        )
        .map_err(|e| Error::io("read /dev/urandom", e))?;
        // Two callers racing: the first key written wins, both return it.
        let _ = self
            .pool
            .compare_and_swap(KEY, None as Option<&[u8]>, Some(&k[..]))?;
        self.db.flush()?;
        let v = self
            .pool
            .get(KEY)?
            .ok_or_else(|| Error::Corrupt("resume key missing after it was written".into()))?;
        <[u8; 32]>::try_from(&v[..])
            .map_err(|_| Error::Corrupt("resume key is not 32 bytes".into()))
    }

    /// The partial receive kept for `name`, if any.
    pub fn partial_get(&self, name: &Name) -> Result<Option<PartialRecord>> {
        match self.partial.get(name.as_str().as_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("partial receive record: {e}"))),
            None => Ok(None),
        }
    }

    /// Every partial receive, in name order.
    pub fn partial_list(&self) -> Result<Vec<PartialRecord>> {
        self.partial
            .iter()
            .map(|kv| {
                serde_json::from_slice(&kv?.1)
                    .map_err(|e| Error::Corrupt(format!("partial receive record: {e}")))
            })
            .collect()
    }

    /// Note how far a partial receive got (after its device was synced up
    /// to there). Not a transaction: one key, flushed before returning.
    pub fn partial_advance(&self, name: &Name, dev: DeviceId, offset: u64) -> Result<()> {
        if let Some(mut p) = self.partial_get(name)?
            && p.dev == dev
        {
            p.offset = offset;
            self.partial.insert(name.as_str().as_bytes(), encode(&p)?)?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// Hidden devices of receives in progress.
    pub fn receiving_list(&self) -> Result<Vec<DeviceId>> {
        self.receiving
            .iter()
            .map(|kv| DeviceId::from_key(&kv?.0))
            .collect()
    }

    /// Run `f` as one transaction over all trees, bump the transaction id,
    /// and flush to disk before returning.
    pub fn txn<T>(&self, f: impl Fn(&Txn<'_>) -> TxResult<T>) -> Result<T> {
        let r = (
            &self.devices,
            &self.names,
            &self.children,
            &self.gc,
            &self.pool,
            &self.receiving,
            &self.partial,
        )
            .transaction(|(devices, names, children, gc, pool, receiving, partial)| {
                let t = Txn {
                    devices,
                    names,
                    children,
                    gc,
                    pool,
                    receiving,
                    partial,
                };
                let v = f(&t)?;
                t.bump()?;
                Ok(v)
            });
        let v = match r {
            Ok(v) => v,
            Err(sled::transaction::TransactionError::Abort(e)) => return Err(e),
            Err(sled::transaction::TransactionError::Storage(e)) => return Err(Error::Meta(e)),
        };
        self.db.flush()?;
        if let Some(h) = self.hook.get()
            && let Some(p) = self.pool()?
        {
            h(p.transaction_id);
        }
        Ok(v)
    }

    /// Install the hook run after every committed transaction (the engine
    /// keeps the backend's transaction id in step with it).
    pub fn set_commit_hook(&self, h: CommitHook) {
        let _ = self.hook.set(h);
    }

    /// The pool record, if the pool was initialised.
    pub fn pool(&self) -> Result<Option<PoolRecord>> {
        match self.pool.get(POOL_KEY)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("pool record: {e}"))),
            None => Ok(None),
        }
    }

    /// Write the pool record (initialisation and geometry changes).
    pub fn set_pool(&self, p: &PoolRecord) -> Result<()> {
        self.pool.insert(POOL_KEY, encode(p)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// One record.
    pub fn get(&self, id: DeviceId) -> Result<Option<DeviceRecord>> {
        match self.devices.get(id.key())? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    /// All records, in id order.
    pub fn list(&self) -> Result<Vec<DeviceRecord>> {
        self.devices.iter().map(|kv| decode(&kv?.1)).collect()
    }

    /// The image called `name`.
    pub fn image_id(&self, name: &Name) -> Result<Option<DeviceId>> {
        self.id_by_key(&name_key(DeviceKind::Image, None, name.as_str()))
    }

    /// The snapshot `name` of `image`.
    pub fn snapshot_id(&self, image: DeviceId, name: &Name) -> Result<Option<DeviceId>> {
        self.id_by_key(&name_key(DeviceKind::Snapshot, Some(image), name.as_str()))
    }

    /// The device whose containerd key is `key`.
    pub fn containerd_id(&self, key: &str) -> Result<Option<DeviceId>> {
        self.id_by_key(&ctd_key(key))
    }

    fn id_by_key(&self, k: &[u8]) -> Result<Option<DeviceId>> {
        match self.names.get(k)? {
            Some(v) => DeviceId::from_key(&v).map(Some),
            None => Ok(None),
        }
    }

    /// Children of `parent` (snapshots of an image, clones of a snapshot).
    pub fn children(&self, parent: DeviceId) -> Result<Vec<DeviceId>> {
        self.children
            .scan_prefix(parent.key())
            .map(|kv| DeviceId::from_key(&kv?.0[4..]))
            .collect()
    }

    /// Backend devices queued for deletion.
    pub fn gc_list(&self) -> Result<Vec<DeviceId>> {
        self.gc
            .iter()
            .map(|kv| DeviceId::from_key(&kv?.0))
            .collect()
    }

    /// Drop a device from the deletion queue once its blocks are freed.
    pub fn gc_done(&self, dev: DeviceId) -> Result<()> {
        self.gc.remove(dev.key())?;
        self.db.flush()?;
        Ok(())
    }

    /// Every backend device id referenced by a record or the gc queue.
    pub fn used_devs(&self) -> Result<BTreeSet<u32>> {
        let mut s = BTreeSet::new();
        for r in self.list()? {
            s.insert(r.id.get());
            s.insert(r.dev.get());
            if let Some(p) = r.pending_dev {
                s.insert(p.get());
            }
        }
        for g in self.gc_list()? {
            s.insert(g.get());
        }
        for g in self.receiving_list()? {
            s.insert(g.get());
        }
        for p in self.partial_list()? {
            s.insert(p.dev.get());
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Bytes, ContainerdInfo, ContainerdKind};

    fn layer(id: u32, key: &str) -> DeviceRecord {
        let dev = DeviceId::new(id).unwrap();
        DeviceRecord {
            id: dev,
            dev,
            name: Name::new(&format!("ctd-{id}")).unwrap(),
            kind: DeviceKind::Containerd,
            parent: None,
            size: Bytes(1 << 30),
            fs: "ext4".into(),
            state: DeviceState::Ready,
            pending_dev: None,
            error: None,
            created: 0,
            seq: 0,
            labels: Default::default(),
            containerd: Some(ContainerdInfo {
                key: key.into(),
                kind: ContainerdKind::Active,
                updated: 0,
            }),
            identity: None,
        }
    }

    /// containerd's key index follows every put (a Commit changes the
    /// key), remove, and is rebuilt at open from the records.
    #[test]
    fn containerd_keys_are_indexed_through_every_change() {
        let dir = std::env::temp_dir().join(format!("thinfs-ctdkeys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = |n| DeviceId::new(n).unwrap();
        {
            let m = Meta::open(&dir).unwrap();
            m.set_pool(&PoolRecord {
                schema: SCHEMA_VERSION,
                backend: "reflink".into(),
                size: Bytes(1 << 30),
                reserve: Bytes(0),
                default_image_size: Bytes(1 << 30),
                transaction_id: 0,
            })
            .unwrap();
            m.txn(|t| t.put(&layer(1, "default/1/extract-a"))).unwrap();
            m.txn(|t| t.put(&layer(2, "default/3/extract-b"))).unwrap();
            assert_eq!(m.containerd_id("default/1/extract-a").unwrap(), Some(id(1)));
            // Commit: the same record under its new key.
            let mut r = layer(1, "default/2/sha256:aa");
            r.containerd.as_mut().unwrap().kind = ContainerdKind::Committed;
            m.txn(|t| t.put(&r)).unwrap();
            assert_eq!(m.containerd_id("default/1/extract-a").unwrap(), None);
            assert_eq!(m.containerd_id("default/2/sha256:aa").unwrap(), Some(id(1)));
            m.txn(|t| t.remove(id(2))).unwrap();
            assert_eq!(m.containerd_id("default/3/extract-b").unwrap(), None);
            // A store written before the index existed: none for its keys.
            m.names.remove(ctd_key("default/2/sha256:aa")).unwrap();
            m.names.insert(ctd_key("stale"), &id(9).key()).unwrap();
            assert_eq!(m.containerd_id("default/2/sha256:aa").unwrap(), None);
        }
        let m = Meta::open(&dir).unwrap();
        assert_eq!(m.containerd_id("default/2/sha256:aa").unwrap(), Some(id(1)));
        assert_eq!(m.containerd_id("stale").unwrap(), None);
        drop(m);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
