//! Partial receives (`receive -s`) and resuming streams (`send -t TOKEN`).
//!
//! A partial receive is a record of the meta `partial` tree, keyed by the
//! NAME of `receive NAME`, naming its device and the stream (snapshot and
//! base identities, size, compression) and the offset below which every
//! range is on the device, synced, and covered by a checkpoint whose
//! blake3 digest of the stream matched. States and what a crash leaves:
//! 1. the device is made hidden (`receiving`): a crash sweeps it;
//! 2. one transaction writes the partial record and drops the device from
//!    `receiving`: from here a crash or an error keeps it, at offset 0;
//! 3. at each checkpoint: the device is synced, then the offset written;
//!    a crash keeps the last offset written (the device holds at least
//!    that much);
//! 4. the publish transaction of the receive also drops the record;
//!    `receive -A NAME` drops it and queues the device in `gc` in one
//!    transaction.
//!
//! The token ([`ResumeToken`]) names the snapshot and base by identity
//! and the offset, sealed with the pool's key. The sender reads it without
//! the key, finds the snapshot by identity and sends the ranges at or
//! above the offset as a stream of its own (own digest and checkpoints),
//! carrying the token back; the receiver opens it with its key, so a
//! changed token is refused before a byte is written.

use super::Engine;
use super::send::{Progress, SendStats};
use crate::error::{Error, Result};
use crate::meta::{DeviceKind, DeviceRecord, PartialRecord};
use crate::stream::{Resume, ResumeToken, StreamHeader};
use crate::types::{Bytes, Name};
use std::collections::BTreeSet;
use std::io::Write;

/// A partial receive as `list` and `info` show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartialInfo {
    /// The NAME of `receive NAME`.
    pub name: String,
    /// The snapshot being received.
    pub snapshot: String,
    /// Its identity.
    pub identity: String,
    /// The base's identity (incremental).
    pub base: Option<String>,
    /// Device size.
    pub size: u64,
    /// Bytes of the device received (every range below this offset).
    pub received: u64,
    /// When the receive started.
    pub created: u64,
    /// The token for `thinfs send -t`.
    pub receive_resume_token: String,
}

/// Partial receives a request is writing right now, by (pool key, NAME):
/// a second resume, or `-A`, waits for nothing and is refused. (The pool
/// key tells pools of one process apart.)
static ACTIVE: parking_lot::Mutex<BTreeSet<([u8; 32], String)>> =
    parking_lot::Mutex::new(BTreeSet::new());

/// One partial receive in use; released on drop.
pub(super) struct InUse(([u8; 32], String));

impl Drop for InUse {
    fn drop(&mut self) {
        ACTIVE.lock().remove(&self.0);
    }
}

impl Engine {
    /// Claim the partial receive of `name` for this request, or refuse.
    pub(super) fn claim_partial(&self, name: &Name) -> Result<InUse> {
        let k = (self.meta.resume_key()?, name.as_str().to_string());
        if !ACTIVE.lock().insert(k.clone()) {
            return Err(Error::Busy(format!(
                "a receive into {name} is running (its partial receive is in use)"
            )));
        }
        Ok(InUse(k))
    }

    fn token_of(&self, p: &PartialRecord) -> Result<String> {
        Ok(ResumeToken {
            snap_id: p.snap_id,
            base_id: p.base_id,
            size: p.size.0,
            offset: p.offset,
            compressed: p.compressed,
        }
        .seal(&self.meta.resume_key()?))
    }

    /// Every partial receive, with its token.
    pub fn partial_receives(&self) -> Result<Vec<PartialInfo>> {
        self.meta
            .partial_list()?
            .into_iter()
            .map(|p| {
                Ok(PartialInfo {
                    receive_resume_token: self.token_of(&p)?,
                    name: p.name.to_string(),
                    snapshot: p.snap_name.clone(),
                    identity: p.snap_id.to_string(),
                    base: p.base_id.map(|b| b.to_string()),
                    size: p.size.0,
                    received: p.offset,
                    created: p.created,
                })
            })
            .collect()
    }

    /// The partial receive of `name`, if any.
    pub fn partial_receive(&self, name: &Name) -> Result<Option<PartialInfo>> {
        Ok(self
            .partial_receives()?
            .into_iter()
            .find(|p| p.name == name.as_str()))
    }

    /// `receive -A NAME`: drop the partial receive and free its device.
    pub fn abandon_receive(&self, name: &Name) -> Result<PartialInfo> {
        let _in_use = self.claim_partial(name)?;
        let info = self
            .partial_receive(name)?
            .ok_or_else(|| Error::NotFound(format!("{name} has no partial receive to abandon")))?;
        let p = self
            .meta
            .partial_get(name)?
            .ok_or_else(|| Error::NotFound(format!("{name} has no partial receive")))?;
        self.meta.txn(|t| {
            t.partial_remove(name)?;
            t.gc_add(p.dev)
        })?;
        self.collect_garbage()?;
        log::info!(
            "abandoned the partial receive of {name}@{} ({} of {} received)",
            p.snap_name,
            Bytes(p.offset),
            p.size
        );
        Ok(info)
    }

    /// An error of a receive that kept its partial state: the same error,
    /// its message ending with how to resume.
    pub(super) fn kept_partial(&self, name: &Name, dev: crate::types::DeviceId, e: Error) -> Error {
        let p = match self.meta.partial_get(name) {
            Ok(Some(p)) if p.dev == dev => p,
            _ => return e,
        };
        let Ok(token) = self.token_of(&p) else {
            return e;
        };
        log::warn!(
            "receive of {name}@{} interrupted at {} of {}: partial state kept ({e})",
            p.snap_name,
            Bytes(p.offset),
            p.size
        );
        let note = format!(
            "; partial receive kept ({} of {} received): resume with `thinfs send -t {token} | thinfs receive {name}`, or abandon with `thinfs receive -A {name}`",
            Bytes(p.offset),
            p.size
        );
        match e {
            Error::BadStream(m) => Error::BadStream(m + &note),
            Error::Cancelled(m) => Error::Cancelled(m + &note),
            Error::Invalid(m) => Error::Invalid(m + &note),
            Error::Busy(m) => Error::Busy(m + &note),
            Error::NoSpace(m) => Error::NoSpace(m + &note),
            Error::Io { what, source } => Error::Io {
                what: what + &note,
                source,
            },
            other => other,
        }
    }

    /// Check a resuming stream against the partial receive of `name` and
    /// the token it carries (sealed by this pool): returns the partial.
    pub(super) fn resumable(
        &self,
        name: &Name,
        h: &StreamHeader,
        partial: Option<PartialRecord>,
    ) -> Result<PartialRecord> {
        let Some(r) = &h.resume else {
            return Err(Error::Invalid("not a resuming stream".into()));
        };
        let tok = ResumeToken::open(&r.token, &self.meta.resume_key()?)?;
        let p = partial.ok_or_else(|| {
            Error::NotFound(format!(
                "{name} has no partial receive to resume (it was finished or abandoned, or the stream is for another name)"
            ))
        })?;
        if tok.snap_id != p.snap_id || tok.base_id != p.base_id || tok.size != p.size.0 {
            return Err(Error::Invalid(format!(
                "resume token refused: it is for another receive than the partial receive of {name} (@{}, identity {})",
                p.snap_name, p.snap_id
            )));
        }
        if tok.offset > p.offset {
            return Err(Error::Invalid(format!(
                "resume token refused: it starts at {} but {name} holds only {} (a token of an abandoned receive?)",
                tok.offset, p.offset
            )));
        }
        if h.snap_id != p.snap_id
            || h.base_id != p.base_id
            || h.size != p.size.0
            || h.snap_name != p.snap_name
            || r.offset != tok.offset
        {
            return Err(Error::BadStream(format!(
                "the resuming stream does not match its token (snapshot {} at {}, token: {} at {})",
                h.snap_id, r.offset, tok.snap_id, tok.offset
            )));
        }
        Ok(p)
    }

    /// `send -t TOKEN`: the rest of an interrupted stream. The snapshot
    /// and base are found by identity; returns the snapshot and the stats.
    pub fn send_resume(
        &self,
        token: &str,
        out: &mut (dyn Write + Send),
        progress: &dyn Progress,
    ) -> Result<(DeviceRecord, Option<DeviceRecord>, SendStats)> {
        let t = ResumeToken::parse(token)?;
        let all = self.meta.list()?;
        let by_id = |id| {
            all.iter()
                .find(|r| r.kind == DeviceKind::Snapshot && r.identity == Some(id))
                .cloned()
        };
        let snap = by_id(t.snap_id).ok_or_else(|| {
            Error::NotFound(format!(
                "no snapshot with identity {} (the token's) in this pool: it was destroyed, or another pool sent the stream",
                t.snap_id
            ))
        })?;
        let base = match t.base_id {
            Some(b) => Some(by_id(b).ok_or_else(|| {
                Error::NotFound(format!(
                    "no snapshot with identity {b} (the token's base) in this pool: it was destroyed"
                ))
            })?),
            None => None,
        };
        if !t.offset.is_multiple_of(super::STREAM_BLOCK as u64) {
            return Err(Error::Invalid(format!(
                "resume token refused: offset {} is not a multiple of {} (a changed token?)",
                t.offset,
                super::STREAM_BLOCK
            )));
        }
        if snap.size.0 != t.size {
            return Err(Error::Invalid(format!(
                "resume token refused: it is for a device of {} bytes, {} has {}",
                t.size,
                self.full_name(&snap),
                snap.size
            )));
        }
        let resume = Resume {
            offset: t.offset,
            token: token.trim().to_string(),
        };
        let stats = self.send_from(
            &snap,
            base.as_ref(),
            t.compressed,
            Some(resume),
            out,
            progress,
        )?;
        Ok((snap, base, stats))
    }
}
