//! Receive: a stream becomes a new snapshot (and for a full stream, a new
//! image), or nothing at all.
//!
//! Order (what a crash at each step leaves):
//! 1. every refusal that needs no data is decided from the stream header:
//!    nothing is made;
//! 2. a hidden device (noted in the meta `receiving` tree, shown nowhere):
//!    empty for a full stream, a clone of the base for an incremental one;
//!    -> crash: the next open moves it to `gc` and deletes it;
//! 3. the ranges are written to its block device and synced (the pool is
//!    checked every [`ROOM_EVERY`] bytes: ENOSPC naming the pool before it
//!    is full); the end record's digest is checked; the filesystem is
//!    checked with e2fsck (`check_received`: a damaged one is refused,
//!    the kernel will parse it and any user may list it); any error deletes the
//!    hidden devices (and a partial receive's, for a damaged filesystem);
//! 4. a second hidden device, a clone of the received snapshot: the new
//!    head of the image;
//! 5. ONE transaction publishes: the snapshot record (name and identity
//!    from the stream), the new image (full) or the image's head swapped
//!    to the new clone with the old head queued in `gc` (incremental).
//!
//! With `-s` (keep), the device of step 2 becomes a partial receive in the
//! same transaction that makes it visible (`partial` tree, see
//! `resume.rs`): checkpoints of the stream advance its offset, an error
//! or a crash keeps it, the publish of step 5 drops it.
//!
//! What arrives is checked before anything is made: the snapshot name by
//! the rules of a new name ([`Name::fresh`]), the device size by the rule
//! of create (`check_new_size`).
//!
//! "Unchanged since its newest snapshot" is decided on the blocks,
//! ignoring what a mount alone writes (see `unchanged.rs`). `-F` does not
//! roll back first: the publish replaces the head anyway, which is exactly
//! a rollback to the base followed by the receive, and a refused or failed
//! receive then leaves the head as it was. It never destroys a snapshot:
//! the base must be the image's newest snapshot.

use super::send::{Hidden, Progress};
use super::{Engine, failpoint, now_secs};
use crate::error::{Error, IoContext, Result};
use crate::meta::{DeviceKind, DeviceRecord, Identity, PartialRecord};
use crate::stream::{Decoder, FLAG_LZ4, Record, StreamHeader};
use crate::sys::tools::Tool;
use crate::types::{Bytes, Name};
use crossbeam_channel::bounded;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

/// Bytes written to a received device between two looks at the pool.
pub const ROOM_EVERY: u64 = 32 << 20;

/// Name prefix of the temporary snapshot a backup carries an image's head
/// in (see `service::backup`): the one name with a leading `-` that a
/// receive may bring, and only into an image a restore is making
/// ([`RESTORING`]).
const HEAD_CARRIER: &str = "-thinfs-backup-head-";
/// Name prefix of the image a restore makes (see `service::backup`): a
/// leading `-`, which no request can give.
const RESTORING: &str = "-thinfs-restore-";

/// The name of a snapshot that arrives in a stream, checked as every new
/// name is ([`Name::fresh`]: no control character, no leading `-`). The
/// image it goes into decides the one exception, [`HEAD_CARRIER`].
pub(super) fn arriving_name(image: &Name, s: &str) -> Result<Name> {
    let carrier = s
        .strip_prefix(HEAD_CARRIER)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let r = if carrier && image.as_str().starts_with(RESTORING) {
        Name::new(s)
    } else {
        Name::fresh(s)
    };
    r.map_err(|e| Error::BadStream(format!("snapshot name in the header: {e}")))
}

/// The first lines of what e2fsck found, without its banner and pass
/// headers, safe to print.
fn e2fsck_findings(out: &std::process::Output) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("e2fsck ") && !l.starts_with("Pass "))
        .take(4)
        .collect();
    crate::types::escape(&crate::types::cut(&lines.join(" / "), 400)).into_owned()
}

/// What a receive made.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Received {
    /// The image (new for a full stream).
    pub image: DeviceRecord,
    /// The new snapshot.
    pub snapshot: DeviceRecord,
    /// Whether the image was created.
    pub created_image: bool,
    /// Whether changes in the image's head since its newest snapshot were
    /// discarded (`-F`).
    pub rolled_back: bool,
    /// Stream bytes read.
    pub bytes: u64,
    /// Ranges written.
    pub ranges: u64,
}

/// The checked plan of a receive.
struct Plan {
    image: Option<DeviceRecord>,
    base: Option<DeviceRecord>,
    snap_name: Name,
    rolled_back: bool,
}

impl Engine {
    fn plan_receive(&self, name: &Name, h: &StreamHeader, force: bool) -> Result<Plan> {
        let snap_name = arriving_name(name, &h.snap_name)?;
        let Some(img_id) = self.image_id(name)? else {
            if let Some(b) = h.base_id {
                return Err(Error::NotFound(format!(
                    "no image {name} to receive an incremental stream (base {b}) into"
                )));
            }
            return Ok(Plan {
                image: None,
                base: None,
                snap_name,
                rolled_back: false,
            });
        };
        let Some(base_id) = h.base_id else {
            return Err(Error::AlreadyExists(format!(
                "image {name} exists; a full stream creates a new image (receive it under another name, or send incrementally)"
            )));
        };
        let img = self.ready(img_id)?;
        let snaps = self.snapshots_of(img_id)?;
        if let Some(s) = snaps.iter().find(|s| s.identity == Some(h.snap_id)) {
            return Err(Error::AlreadyExists(format!(
                "{name}@{} already has this snapshot (identity {}): up to date",
                s.name, h.snap_id
            )));
        }
        if let Some(s) = snaps.iter().find(|s| s.name == snap_name) {
            return Err(Error::AlreadyExists(format!(
                "{name}@{} exists with another identity ({}, the stream's is {})",
                s.name,
                s.identity.map(|i| i.to_string()).unwrap_or_default(),
                h.snap_id
            )));
        }
        let Some(base) = snaps.iter().find(|s| s.identity == Some(base_id)).cloned() else {
            return Err(Error::NotFound(format!(
                "{name} has no snapshot with identity {base_id}, the stream's base (matched by identity, not by name)"
            )));
        };
        let newer: Vec<String> = snaps
            .iter()
            .filter(|s| s.seq > base.seq)
            .map(|s| s.name.to_string())
            .collect();
        if !newer.is_empty() {
            return Err(Error::Busy(format!(
                "the stream's base {name}@{} is not the newest snapshot of {name} (newer: {}); nothing is destroyed to make room",
                base.name,
                newer.join(", ")
            )));
        }
        let rolled_back = self.check_unchanged(&img, &base, force)?;
        Ok(Plan {
            image: Some(img),
            base: Some(base),
            snap_name,
            rolled_back,
        })
    }

    /// Refuse if `img` changed since `base` (unless `force`); with the
    /// image offline. Returns whether changes will be discarded.
    fn check_unchanged(
        &self,
        img: &DeviceRecord,
        base: &DeviceRecord,
        force: bool,
    ) -> Result<bool> {
        let what = format!("receive into {}", img.name);
        self.with_offline(std::slice::from_ref(img), &what, |_| {
            let img = self.ready(img.id)?;
            match self.changed_since(&img, base)? {
                None => Ok(false),
                Some(_) if force => Ok(true),
                Some(at) => Err(Error::Busy(format!(
                    "{} was changed since its newest snapshot {} (first difference at byte {at}); use -F to discard the changes",
                    img.name, base.name
                ))),
            }
        })
    }

    /// Receive a stream from `input` as image `name`.
    pub fn receive_stream(
        &self,
        name: &Name,
        force: bool,
        input: &mut (dyn Read + Send),
        progress: &dyn Progress,
    ) -> Result<Received> {
        self.receive_stream_with(name, force, false, input, progress)
    }

    /// Receive a stream; with `keep` (`receive -s`), an interrupted
    /// receive stays as a partial receive to resume (see `resume.rs`). A
    /// resuming stream (`send -t`) continues the partial receive of `name`.
    pub fn receive_stream_with(
        &self,
        name: &Name,
        force: bool,
        keep: bool,
        input: &mut (dyn Read + Send),
        progress: &dyn Progress,
    ) -> Result<Received> {
        let mut dec = Decoder::new(input)?;
        let h = dec.header().clone();
        let partial = self.meta.partial_get(name)?;
        if h.resume.is_some() {
            let p = self.resumable(name, &h, partial)?;
            return self.receive_into(name, force, true, Some(p), &mut dec, progress);
        }
        if let Some(p) = partial {
            return Err(Error::Busy(format!(
                "{name} has a partial receive (of @{}, {} of {} received): resume it with `thinfs send -t TOKEN | thinfs receive {name}` (TOKEN: `thinfs info {name} --json`, receive_resume_token), or abandon it with `thinfs receive -A {name}`",
                p.snap_name,
                Bytes(p.offset),
                p.size
            )));
        }
        self.receive_into(name, force, keep, None, &mut dec, progress)
    }

    /// The receive proper. `resume`: the partial receive to continue;
    /// else with `keep` a new partial receive is started.
    fn receive_into(
        &self,
        name: &Name,
        force: bool,
        keep: bool,
        resume: Option<PartialRecord>,
        dec: &mut Decoder<&mut (dyn Read + Send)>,
        progress: &dyn Progress,
    ) -> Result<Received> {
        let h = dec.header().clone();
        let plan = self.plan_receive(name, &h, force)?;
        let size = Bytes(h.size);
        if let Some(img) = &plan.image
            && size.0 < img.size.0
        {
            return Err(Error::Invalid(format!(
                "the stream's device ({size}) is smaller than image {name} ({})",
                img.size
            )));
        }
        let what = format!("receive {name}@{}", plan.snap_name);
        match &resume {
            // The device was made, its size checked, when the partial
            // receive started.
            Some(_) => self.check_reserve(&what)?,
            None => self.check_new_size(size, &what)?,
        }
        progress.total(h.size);
        let mut hidden = Hidden::new(self);
        let origin = plan.base.as_ref().map(|b| b.dev);
        // A partial receive is written by one request at a time, and
        // `-A` waits for none (see `resume.rs`).
        let _in_use = match resume.is_some() || keep {
            true => Some(self.claim_partial(name)?),
            false => None,
        };
        let (snap_dev, keep) = match resume {
            Some(p) => (p.dev, Some(p)),
            None if keep => {
                let p = PartialRecord {
                    name: name.clone(),
                    dev: hidden.make(origin, size)?,
                    snap_name: h.snap_name.clone(),
                    snap_id: h.snap_id,
                    base_id: h.base_id,
                    size,
                    offset: 0,
                    compressed: h.flags & FLAG_LZ4 != 0,
                    created: now_secs(),
                };
                // From here the device is the partial receive's: shown by
                // list and info, swept by no restart.
                self.meta.txn(|t| t.partial_put(&p))?;
                hidden.devs.retain(|d| *d != p.dev);
                (p.dev, Some(p))
            }
            None => (hidden.make(origin, size)?, None),
        };
        failpoint("receive.hidden");
        let written = self
            .write_ranges(snap_dev, size, dec, keep.as_ref(), progress, &what)
            .map_err(|e| self.full_pool_error(&what, e));
        let (bytes, ranges) = match (written, &keep) {
            (Ok(w), _) => w,
            (Err(e), Some(p)) => return Err(self.kept_partial(name, p.dev, e)),
            (Err(e), None) => return Err(nothing_received(e)),
        };
        failpoint("receive.written");
        if let Err(e) = self.check_received(snap_dev, size, &what) {
            // Resuming cannot mend what the sender sent: the partial
            // receive goes too.
            if let Some(p) = &keep {
                self.meta.txn(|t| {
                    t.partial_remove(name)?;
                    t.gc_add(p.dev)
                })?;
                self.collect_garbage()?;
            }
            return Err(e);
        }
        let head_dev = hidden.make(Some(snap_dev), size)?;
        let mut snap = super::create::ready_record(
            snap_dev,
            plan.snap_name.clone(),
            DeviceKind::Snapshot,
            size,
            0,
            Some(h.snap_id),
        );
        let image = match &plan.image {
            None => {
                snap.seq = self.meta.pool()?.map(|p| p.transaction_id + 1).unwrap_or(0);
                let mut img = DeviceRecord {
                    id: head_dev,
                    dev: head_dev,
                    name: name.clone(),
                    kind: DeviceKind::Image,
                    identity: None,
                    ..snap.clone()
                };
                // An image the daemon makes under a name no request can
                // give (a restore) is its temporary until renamed.
                if name.as_str().starts_with(RESTORING) {
                    img.labels
                        .insert(super::TEMPORARY_LABEL.to_string(), "restore".to_string());
                }
                snap.parent = Some(img.id);
                self.meta.txn(|t| {
                    t.receiving_done(snap_dev)?;
                    t.receiving_done(head_dev)?;
                    t.partial_remove(name)?;
                    t.put(&img)?;
                    t.put(&snap)
                })?;
                img
            }
            Some(img) => {
                self.publish_incremental(img, plan.base.as_ref(), &mut snap, head_dev, force)?
            }
        };
        hidden.published();
        failpoint("receive.done");
        self.collect_garbage()?;
        log::info!(
            "received {}@{} (identity {}, {} ranges, {bytes} stream bytes{})",
            image.name,
            snap.name,
            h.snap_id,
            ranges,
            match &h.resume {
                Some(r) => format!(", resumed at byte {} of the device", r.offset),
                None => String::new(),
            }
        );
        Ok(Received {
            image,
            snapshot: snap,
            created_image: plan.image.is_none(),
            rolled_back: plan.rolled_back,
            bytes,
            ranges,
        })
    }

    fn publish_incremental(
        &self,
        img: &DeviceRecord,
        base: Option<&DeviceRecord>,
        snap: &mut DeviceRecord,
        head_dev: crate::types::DeviceId,
        force: bool,
    ) -> Result<DeviceRecord> {
        let base =
            base.ok_or_else(|| Error::Invalid("incremental receive without a base".into()))?;
        let what = format!("receive into {}", img.name);
        self.with_offline(std::slice::from_ref(img), &what, |_| {
            let mut img = self.ready(img.id)?;
            let still: Vec<Identity> = self
                .snapshots_of(img.id)?
                .iter()
                .filter(|s| s.seq > base.seq)
                .filter_map(|s| s.identity)
                .collect();
            if !still.is_empty() || self.meta.get(base.id)?.is_none() {
                return Err(Error::Busy(format!(
                    "snapshots of {} changed during the receive; nothing was received",
                    img.name
                )));
            }
            if !force && let Some(at) = self.changed_since(&img, base)? {
                return Err(Error::Busy(format!(
                    "{} was changed during the receive (first difference at byte {at}); nothing was received, use -F to discard the changes",
                    img.name
                )));
            }
            let old = img.dev;
            img.dev = head_dev;
            img.size = snap.size;
            snap.parent = Some(img.id);
            snap.seq = self.meta.pool()?.map(|p| p.transaction_id + 1).unwrap_or(0);
            let dev_snap = snap.dev;
            let s = snap.clone();
            let name = img.name.clone();
            self.meta.txn(|t| {
                t.receiving_done(dev_snap)?;
                t.receiving_done(head_dev)?;
                t.partial_remove(&name)?;
                t.put(&s)?;
                t.put(&img)?;
                t.gc_add(old)
            })?;
            Ok(img)
        })
    }

    /// Check the filesystem received on `dev` (the daemon's own e2fsck
    /// runs: nothing is mounted, the received device is never changed).
    /// `e2fsck -fn` must find nothing; if it finds something, a throwaway
    /// clone is checked with `e2fsck -fp` (preen, what a boot does): a
    /// snapshot of a live filesystem carries the files that were open but
    /// deleted on its orphan list, which `-fn` reports and preen handles,
    /// and so do counts and bitmaps; anything preen will not repair on its
    /// own (a damaged directory, inode or extent tree) is EBADMSG with the
    /// first lines of what `-fn` found.
    fn check_received(&self, dev: crate::types::DeviceId, size: Bytes, what: &str) -> Result<()> {
        let fsck = |flag: &str, path: &std::path::Path| -> Result<std::process::Output> {
            let t0 = std::time::Instant::now();
            let out = Tool::E2fsck
                .output([flag.as_ref(), path.as_os_str()])
                .ctx(|| format!("{what}: check the received filesystem"))?;
            log::info!(
                "{what}: e2fsck {flag} of the received filesystem: {} in {} ms",
                match out.status.code() {
                    Some(c) => format!("exit {c}"),
                    None => "killed".to_string(),
                },
                t0.elapsed().as_millis()
            );
            Ok(out)
        };
        let found = {
            let active = self.backend.activate(dev, size, true)?;
            let out = fsck("-fn", active.path())?;
            if out.status.success() {
                return Ok(());
            }
            e2fsck_findings(&out)
        };
        let mut scratch = Hidden::new(self);
        let copy = scratch.make(Some(dev), size)?;
        let preen = {
            let active = self.backend.activate(copy, size, false)?;
            fsck("-fp", active.path())?
        };
        drop(scratch);
        if matches!(preen.status.code(), Some(0 | 1)) {
            log::warn!(
                "{what}: e2fsck -fn found: {found}; e2fsck -fp repairs that on its own (checked on a scratch copy): accepted"
            );
            return Ok(());
        }
        Err(Error::BadStream(format!(
            "{what}: the received filesystem is damaged, e2fsck -fn found: {found}; nothing was received"
        )))
    }

    /// Decode (in a thread) and write every range to `dev`; sync. Returns
    /// (stream bytes, ranges) once the end record checked out. Every
    /// [`ROOM_EVERY`] bytes written the device is synced and the pool
    /// checked ([`Engine::pool_has_room`]): the space guard does not watch
    /// a device that no filesystem of the engine's has mounted.
    fn write_ranges(
        &self,
        dev: crate::types::DeviceId,
        size: Bytes,
        dec: &mut Decoder<&mut (dyn Read + Send)>,
        keep: Option<&PartialRecord>,
        progress: &dyn Progress,
        what: &str,
    ) -> Result<(u64, u64)> {
        let active = self.backend.activate(dev, size, false)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(active.path())
            .ctx(|| format!("open {}", active.path().display()))?;
        self.pool_has_room(what, ROOM_EVERY)?;
        let (tx, rx) = bounded::<Result<Record>>(4);
        let mut ranges = 0u64;
        let mut unchecked = 0u64;
        let d = &mut *dec;
        let res: Result<()> = std::thread::scope(|s| {
            let reader = s.spawn(move || {
                loop {
                    match d.next() {
                        Ok(Some(r)) => {
                            if tx.send(Ok(r)).is_err() {
                                return;
                            }
                            super::panic_point("receive.decoder-panic");
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            });
            let mut r = Ok(());
            for rec in rx.iter() {
                let step = rec.and_then(|rec| {
                    ranges += !matches!(rec, Record::Check { .. }) as u64;
                    match rec {
                        Record::Check { upto } => match keep {
                            Some(p) => {
                                f.sync_data().ctx(|| "sync the received device".into())?;
                                self.meta.partial_advance(&p.name, p.dev, upto)?;
                                failpoint("receive.checkpoint");
                                Ok(())
                            }
                            None => Ok(()),
                        },
                        Record::Data { offset, data } => {
                            f.write_all_at(&data, offset)
                                .ctx(|| format!("write the received device at {offset}"))?;
                            unchecked += data.len() as u64;
                            if unchecked >= ROOM_EVERY {
                                f.sync_data().ctx(|| "sync the received device".into())?;
                                self.pool_has_room(what, ROOM_EVERY)?;
                                unchecked = 0;
                            }
                            progress.advance(data.len() as u64)
                        }
                        Record::Zero { offset, len } => {
                            zero_range(&f, offset, len)?;
                            progress.advance(len)
                        }
                    }
                });
                if let Err(e) = step {
                    r = Err(e);
                    break;
                }
            }
            drop(rx);
            // A decoder that panicked ended its channel early: what was
            // written is not the whole stream.
            if reader.join().is_err() && r.is_ok() {
                log::error!("the stream decoder panicked (a bug); the receive fails");
                r = Err(Error::io(
                    "decode the stream",
                    std::io::Error::other("the decoder thread panicked"),
                ));
            }
            r
        });
        res?;
        f.sync_all().ctx(|| "sync the received device".into())?;
        Ok((dec.position(), ranges))
    }
}

/// An error of a receive that keeps nothing, saying so when it is about
/// the pool (the other errors say what they are about).
fn nothing_received(e: Error) -> Error {
    match e {
        Error::NoSpace(m) if !m.contains("nothing was received") => {
            Error::NoSpace(m + "; nothing was received")
        }
        e => e,
    }
}

/// Zero a range of a block device: discard it (punch a hole) where the
/// device can, else write zeros.
fn zero_range(f: &std::fs::File, offset: u64, len: u64) -> Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    if crate::sys::file::fallocate(f.as_fd(), mode, offset, len).is_ok() {
        return Ok(());
    }
    let z = vec![0u8; (len as usize).min(1 << 20)];
    let mut off = offset;
    while off < offset + len {
        let n = ((offset + len - off) as usize).min(z.len());
        f.write_all_at(&z[..n], off)
            .ctx(|| format!("zero the received device at {off}"))?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn arriving_names_follow_the_new_name_rules() {
        assert_eq!(arriving_name(&name("img"), "s1").unwrap().as_str(), "s1");
        for bad in [
            "-x",
            "-thinfs-backup-head-1",
            "a\x1bb",
            "a\nb",
            "c1\u{9b}",
            ".x",
            "a@b",
        ] {
            let e = arriving_name(&name("img"), bad).unwrap_err();
            assert_eq!(e.errno(), libc::EBADMSG, "{bad:?}");
            assert!(!e.to_string().chars().any(char::is_control), "{e}");
        }
        // A restore's own image takes a backup's head carrier, nothing else
        // with a leading '-'.
        // Not into another image with an odd name (an older version's).
        assert!(arriving_name(&name("-old"), "-thinfs-backup-head-42").is_err());
        let restore = name("-thinfs-restore-1-0");
        assert!(arriving_name(&restore, "-thinfs-backup-head-42").is_ok());
        for bad in [
            "-thinfs-backup-head-",
            "-thinfs-backup-head-4x",
            "-y",
            "a\x07",
        ] {
            assert!(arriving_name(&restore, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn e2fsck_findings_skip_the_banner_and_escape() {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Output {
            status: std::process::ExitStatus::from_raw(4 << 8),
            stdout: b"Pass 1: Checking inodes\nPass 2: Checking directory structure\nDirectory inode 12, block #0, offset 0: directory corrupted\nSalvage? no\n\x1b[31m\n".to_vec(),
            stderr: b"e2fsck 1.47.0 (5-Feb-2023)\n".to_vec(),
        };
        let f = e2fsck_findings(&out);
        assert_eq!(
            f,
            "Directory inode 12, block #0, offset 0: directory corrupted / Salvage? no / \\x1b[31m"
        );
    }
}
