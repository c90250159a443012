//! `thinfs backup NAME -o FILE`, `thinfs backup verify FILE` and `thinfs
//! restore FILE [NAME]`: one file holding an image's snapshots and head as
//! send streams, so a backup made on one backend restores on the other.
//!
//! File layout: the magic [`MAGIC`]; the sections (send streams: the oldest
//! snapshot full, every later one incremental from the one before, then
//! the head as the stream of a temporary snapshot, incremental from the
//! newest); the index (JSON: names, identities, sizes, labels, the backend
//! it came from, and each section's place and BLAKE3 hashes per
//! [`CHUNK`]); then the trailer: the index's length (u64 LE), its BLAKE3
//! hash, and [`END`]. `verify` checks every hash without a pool and names
//! the section and byte range of any damage.
//!
//! Restore checks the whole file first (nothing is made from a damaged
//! file), then receives every section into an image named
//! `-thinfs-restore-PID-N` (a name no request can make), renamed to NAME in
//! one transaction when the last one is in; any error destroys it with its
//! snapshots, and one left by a daemon that died is destroyed when the next
//! one starts ([`Service::sweep_restore_leftovers`]). Restore needs root,
//! like import.

use super::{Caller, Job, Service};
use crate::engine::{Progress, Target};
use crate::error::{Error, Result};
use crate::meta::DeviceRecord;
use crate::types::Name;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

/// First bytes of a backup file.
pub const MAGIC: &[u8] = b"THINFS-BACKUP-1\n";
/// Last bytes of a backup file.
pub const END: &[u8] = b"THINFS-BACKUP-END\n";
/// Bytes covered by one hash of a section.
pub const CHUNK: u64 = 1 << 20;
/// Name prefix of the temporary snapshot that carries the image's head (a
/// leading `-`: no request can make such a name, so the sweep at start
/// never takes a user's snapshot).
const HEAD: &str = "-thinfs-backup-head";
/// Name prefix of an image being restored (renamed to its name at the
/// end); a leading `-` is refused in every name a request makes.
const RESTORE_PREFIX: &str = "-thinfs-restore-";
static RESTORE_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One section: a send stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    /// Snapshot name (`-thinfs-backup-head-PID` for the head's carrier).
    pub name: String,
    /// The head of the image (restored as the image, not a snapshot).
    pub head: bool,
    /// Identity of the snapshot.
    pub identity: String,
    /// The section it is incremental from, if any.
    pub base: Option<String>,
    /// Device size.
    pub size: u64,
    /// Creation time (seconds since the epoch).
    pub created: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Offset in the file.
    pub offset: u64,
    /// Length in the file.
    pub length: u64,
    /// BLAKE3 of each [`CHUNK`] of the section, hex.
    pub hashes: Vec<String>,
}

/// The index of a backup file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupIndex {
    /// The image backed up.
    pub image: String,
    /// The backend it came from (`reflink`, `dm`).
    pub backend: String,
    /// When (seconds since the epoch).
    pub created: u64,
    /// Image labels.
    pub labels: BTreeMap<String, String>,
    /// Sections in file order.
    pub sections: Vec<Section>,
}

/// `thinfs backup NAME [--snapshots]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupRequest {
    /// The image.
    pub name: String,
    /// Every snapshot too (else only the head).
    pub snapshots: bool,
}

/// `thinfs restore FILE [NAME]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The image to make (default: the name in the backup).
    pub name: Option<String>,
}

struct JobProgress<'a>(&'a Job, &'a str);

impl Progress for JobProgress<'_> {
    fn total(&self, _n: u64) {}
    fn advance(&self, n: u64) -> Result<()> {
        self.0.advance(n);
        self.0.check(self.1)
    }
}

/// A writer that counts and hashes what goes through, per [`CHUNK`].
struct Hashing<'a> {
    out: &'a mut (dyn Write + Send),
    pos: u64,
    hashes: Vec<String>,
    cur: blake3::Hasher,
    in_chunk: u64,
}

impl<'a> Hashing<'a> {
    fn new(out: &'a mut (dyn Write + Send), pos: u64) -> Hashing<'a> {
        Hashing {
            out,
            pos,
            hashes: Vec::new(),
            cur: blake3::Hasher::new(),
            in_chunk: 0,
        }
    }
    fn finish(mut self) -> (u64, Vec<String>) {
        if self.in_chunk > 0 {
            self.hashes.push(self.cur.finalize().to_hex().to_string());
        }
        (self.pos, self.hashes)
    }
}

impl Write for Hashing<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(b)?;
        let mut rest = &b[..n];
        while !rest.is_empty() {
            let take = rest.len().min((CHUNK - self.in_chunk) as usize);
            self.cur.update(&rest[..take]);
            self.in_chunk += take as u64;
            if self.in_chunk == CHUNK {
                self.hashes.push(self.cur.finalize().to_hex().to_string());
                self.cur = blake3::Hasher::new();
                self.in_chunk = 0;
            }
            rest = &rest[take..];
        }
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Largest index a backup file may have, checked before any of it is
/// read. The index holds about 67 bytes per [`CHUNK`] of sections (one
/// hash each) plus names and labels: 1 GiB covers some 16 TiB of
/// streams. `backup` refuses to write a larger one.
pub const MAX_INDEX: u64 = 1 << 30;

/// A reader that hashes what goes through.
struct HashRead<R> {
    inner: R,
    hash: blake3::Hasher,
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Read and check a backup file's trailer and index.
///
/// Nothing is allocated from a length the file states: the index length
/// is bounded ([`MAX_INDEX`], and the file), and the index is parsed as
/// it is read, so the memory it takes follows the bytes really there (a
/// sparse file that claims a huge index costs nothing). Every section must
/// lie inside the file, before the index, in order, with one hash per
/// [`CHUNK`].
pub fn read_index(f: &mut File) -> Result<BackupIndex> {
    let io = |e| Error::io("read the backup file", e);
    let len = f.seek(SeekFrom::End(0)).map_err(io)?;
    let tail = (8 + 32 + END.len()) as u64;
    if len < MAGIC.len() as u64 + tail {
        return Err(Error::BadStream(format!(
            "the backup file is too short ({len} bytes): truncated or not a backup"
        )));
    }
    let mut magic = vec![0u8; MAGIC.len()];
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    f.read_exact(&mut magic).map_err(io)?;
    if magic != MAGIC {
        return Err(Error::BadStream(
            "not a thinfs backup file (bad magic at byte 0)".into(),
        ));
    }
    let mut t = vec![0u8; tail as usize];
    f.seek(SeekFrom::Start(len - tail)).map_err(io)?;
    f.read_exact(&mut t).map_err(io)?;
    if &t[40..] != END {
        return Err(Error::BadStream(format!(
            "the backup file has no end marker at byte {}: truncated",
            len - END.len() as u64
        )));
    }
    let ilen = u64::from_le_bytes(t[..8].try_into().unwrap_or_default());
    if ilen > len - tail - MAGIC.len() as u64 {
        return Err(Error::BadStream(format!(
            "the index length is damaged ({ilen} bytes, more than the file holds)"
        )));
    }
    if ilen > MAX_INDEX {
        return Err(Error::BadStream(format!(
            "the index length is damaged ({ilen} bytes, over the limit of {MAX_INDEX})"
        )));
    }
    let at = len - tail - ilen;
    f.seek(SeekFrom::Start(at)).map_err(io)?;
    let mut r = std::io::BufReader::new(HashRead {
        inner: (&mut *f).take(ilen),
        hash: blake3::Hasher::new(),
    });
    let damaged = |why: String| {
        Error::BadStream(format!(
            "the index (bytes {at}..{}) is damaged{why}",
            at + ilen
        ))
    };
    let parsed: serde_json::Result<BackupIndex> = serde_json::from_reader(&mut r);
    let idx = match parsed {
        Ok(idx) => idx,
        Err(e) => match e.io_error_kind() {
            Some(kind) => return Err(io(std::io::Error::new(kind, e))),
            None => return Err(damaged(format!(": {e}"))),
        },
    };
    // from_reader read to the end (only white space may follow): what is
    // left, if anything, is hashed too.
    std::io::copy(&mut r, &mut std::io::sink()).map_err(io)?;
    if r.into_inner().hash.finalize().as_bytes()[..] != t[8..40] {
        return Err(damaged(String::new()));
    }
    check_sections(&idx, at)?;
    Ok(idx)
}

/// Longest label value a backup may carry: what a `label` request can
/// set (a request line is at most 64 KiB).
pub const MAX_LABEL_VALUE: usize = 64 << 10;

/// Labels as a `label` request could set them: keys of 1-255 bytes
/// without `=` or NUL, values of at most [`MAX_LABEL_VALUE`].
fn check_labels(labels: &BTreeMap<String, String>, whose: &str) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() || k.len() > 255 || k.contains('=') || k.contains('\0') {
            return Err(Error::BadStream(format!(
                "the index: {whose} has a bad label key {:?} (1-255 bytes, no '=' or NUL)",
                crate::types::cut(k, crate::types::MAX_SHOWN)
            )));
        }
        if v.len() > MAX_LABEL_VALUE {
            return Err(Error::BadStream(format!(
                "the index: {whose} has a label value of {} bytes (at most {MAX_LABEL_VALUE})",
                v.len()
            )));
        }
    }
    Ok(())
}

/// Every section inside the file (after the magic, before the index at
/// `end`), in order, not overlapping, one hash per [`CHUNK`], the head
/// last and only there; labels as a request could set them.
fn check_sections(idx: &BackupIndex, end: u64) -> Result<()> {
    let bad = |why: String| Err(Error::BadStream(format!("the index: {why}")));
    check_labels(&idx.labels, "the image")?;
    let mut next = MAGIC.len() as u64;
    if idx.sections.last().is_none_or(|s| !s.head) {
        return bad("its last section is not the image's head".into());
    }
    for (i, s) in idx.sections.iter().enumerate() {
        if s.head && i + 1 != idx.sections.len() {
            return bad(format!("section {i} is a second head"));
        }
        match s.offset.checked_add(s.length) {
            Some(stop) if s.offset >= next && stop <= end => next = stop,
            _ => {
                return bad(format!(
                    "section {i} at {}+{} lies outside bytes {next}..{end} of the file",
                    s.offset, s.length
                ));
            }
        }
        check_labels(&s.labels, &format!("section {i}"))?;
        if s.length.div_ceil(CHUNK) != s.hashes.len() as u64 {
            return bad(format!(
                "section {i} has {} hashes for {} bytes",
                s.hashes.len(),
                s.length
            ));
        }
    }
    Ok(())
}

/// Check every hash of a backup file; the first damage is the error, with
/// the section and the byte range. Returns the index.
pub fn verify_file(f: &mut File, mut progress: impl FnMut(u64)) -> Result<BackupIndex> {
    let idx = read_index(f)?;
    let mut buf = vec![0u8; CHUNK as usize];
    for s in &idx.sections {
        f.seek(SeekFrom::Start(s.offset))
            .map_err(|e| Error::io("read the backup file", e))?;
        for (i, want) in s.hashes.iter().enumerate() {
            let from = i as u64 * CHUNK;
            let n = (s.length - from).min(CHUNK) as usize;
            f.read_exact(&mut buf[..n])
                .map_err(|e| Error::io("read the backup file", e))?;
            if blake3::hash(&buf[..n]).to_hex().as_str() != want {
                let start = s.offset + from;
                return Err(Error::BadStream(format!(
                    "damage in section {} ({}), at bytes {start}..{} of the file",
                    crate::types::escape(&crate::types::cut(&s.name, crate::types::MAX_SHOWN)),
                    if s.head { "the head" } else { "a snapshot" },
                    start + n as u64
                )));
            }
            progress(n as u64);
        }
    }
    Ok(idx)
}

/// Destroys a temporary snapshot on drop.
struct Temp<'a>(&'a crate::engine::Engine, crate::types::DeviceId);

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        for i in 0..10 {
            match self.0.destroy_id(self.1) {
                Ok(()) => return,
                Err(Error::Busy(_)) => {
                    std::thread::sleep(std::time::Duration::from_millis(100 << i.min(4)))
                }
                Err(e) => {
                    log::error!("backup: cannot destroy a temporary snapshot: {e}");
                    return;
                }
            }
        }
    }
}

impl Service {
    /// Write a backup of image `req.name` to `out` (root or admin group:
    /// it reads every block).
    pub fn backup(
        &self,
        c: &Caller,
        req: &BackupRequest,
        out: File,
        job: &Job,
    ) -> Result<BackupIndex> {
        let name = Name::new(&req.name)?;
        self.require_admin(c, &format!("backup of {name} (reads every block)"))?;
        let e = &self.engine;
        let img = e.resolve(&Target {
            image: name.clone(),
            snap: None,
        })?;
        let mut snaps: Vec<DeviceRecord> = if req.snapshots {
            e.snapshots_of(img.id)?
        } else {
            Vec::new()
        };
        snaps.sort_by_key(|s| s.seq);
        let tmp_name = Name::new(&format!("{HEAD}-{}", std::process::id()))?;
        let head = e.snapshot_temporary(img.id, &tmp_name, "backup-head")?;
        let _temp = Temp(e, head.id);
        let total: u64 = snaps.iter().map(|s| s.size.0).sum::<u64>() + head.size.0;
        job.set_total(Some(total));
        // Checks the job between writes and never blocks for good on a
        // pipe nobody reads: a cancel is seen.
        let file = out
            .try_clone()
            .map_err(|e| Error::io("duplicate the output", e))?;
        let mut out = super::tarwalk::JobWriter::new(out, job)?;
        out.write_all(MAGIC)
            .map_err(|e| Error::io("write the backup", e))?;
        let mut pos = MAGIC.len() as u64;
        let mut sections = Vec::new();
        let mut base: Option<&DeviceRecord> = None;
        let what = format!("backup of {name}");
        let all: Vec<(&DeviceRecord, bool)> = snaps
            .iter()
            .map(|s| (s, false))
            .chain(std::iter::once((&head, true)))
            .collect();
        for (s, is_head) in all {
            let mut w = Hashing::new(&mut out, pos);
            e.send_stream(s, base, false, &mut w, &JobProgress(job, &what))?;
            let (end, hashes) = w.finish();
            sections.push(Section {
                name: s.name.to_string(),
                head: is_head,
                identity: s.identity.map(|i| i.to_string()).unwrap_or_default(),
                base: base.map(|b| b.name.to_string()),
                size: s.size.0,
                created: s.created,
                labels: s.labels.clone(),
                offset: pos,
                length: end - pos,
                hashes,
            });
            pos = end;
            base = Some(s);
        }
        let idx = BackupIndex {
            image: name.to_string(),
            backend: e.backend().kind().to_string(),
            created: crate::engine::now_secs(),
            labels: img.labels.clone(),
            sections,
        };
        let json = serde_json::to_vec(&idx).map_err(|e| Error::Invalid(e.to_string()))?;
        if json.len() as u64 > MAX_INDEX {
            return Err(Error::Invalid(format!(
                "the backup's index would take {} bytes, over the limit of {MAX_INDEX} that restore reads: back up fewer snapshots",
                json.len()
            )));
        }
        let mut tail = json.clone();
        tail.extend_from_slice(&(json.len() as u64).to_le_bytes());
        tail.extend_from_slice(blake3::hash(&json).as_bytes());
        tail.extend_from_slice(END);
        out.write_all(&tail)
            .and_then(|_| out.flush())
            .and_then(|_| match file.sync_all() {
                // A pipe cannot be synced.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                r => r,
            })
            .map_err(|e| Error::io("write the backup", e))?;
        Ok(idx)
    }

    /// Restore a backup file: checked whole first, then received; all or
    /// nothing. Root only.
    pub fn restore(
        &self,
        c: &Caller,
        req: &RestoreRequest,
        mut input: File,
        job: &Job,
    ) -> Result<BackupIndex> {
        if c.uid != 0 {
            return Err(Error::PermissionDenied(format!(
                "restore needs root (uid {} asked): it writes any owner, setuid files and device nodes into an image mounted with suid and dev, so the admin group is not enough",
                c.uid
            )));
        }
        let st = input
            .metadata()
            .map_err(|e| Error::io("stat the backup file", e))?;
        if !st.is_file() {
            return Err(Error::Invalid(
                "restore reads a backup FILE (it is checked whole before anything is made), not a pipe".into(),
            ));
        }
        job.set_total(Some(st.len().saturating_mul(2)));
        let idx = verify_file(&mut input, |n| job.advance(n))?;
        let name = Name::fresh(req.name.as_deref().unwrap_or(&idx.image))?;
        if self.engine.image_id(&name)?.is_some() {
            return Err(Error::AlreadyExists(format!("image {name}")));
        }
        let n = RESTORE_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = Name::new(&format!("{RESTORE_PREFIX}{}-{n}", std::process::id()))?;
        let tmp_t = Target {
            image: tmp.clone(),
            snap: None,
        };
        let r = self
            .receive_sections(&tmp, &idx, &mut input, job)
            .and_then(|()| self.engine.rename(&tmp_t, &name));
        if let Err(err) = r {
            if self.engine.image_id(&tmp)?.is_some()
                && let Err(d) = self.engine.destroy(&tmp_t, true)
            {
                log::error!("restore of {name} failed and its undo too: {d}");
            }
            return Err(err);
        }
        Ok(idx)
    }

    fn receive_sections(
        &self,
        name: &Name,
        idx: &BackupIndex,
        input: &mut File,
        job: &Job,
    ) -> Result<()> {
        let e = &self.engine;
        let what = format!("restore of {}", idx.image);
        let img = |snap: Option<Name>| Target {
            image: name.clone(),
            snap,
        };
        for s in &idx.sections {
            input
                .seek(SeekFrom::Start(s.offset))
                .map_err(|e| Error::io("read the backup file", e))?;
            let mut part = (&mut *input).take(s.length);
            e.receive_stream(name, false, &mut part, &JobProgress(job, &what))?;
            let snap = img(Some(Name::new(&s.name)?));
            if s.head {
                // The head is the image now; its snapshot was only a carrier.
                e.destroy(&snap, false)?;
            } else {
                for (k, v) in &s.labels {
                    e.set_label(&snap, k, Some(v))?;
                }
            }
        }
        for (k, v) in &idx.labels {
            e.set_label(&img(None), k, Some(v))?;
        }
        Ok(())
    }

    /// Destroy images left half restored, and head carriers left by a
    /// backup, by a daemon that died (call before serving). Returns how
    /// many. Their names start with `-`, which no request can give a new
    /// image ([`Name::fresh`]), and they carry the daemon's own mark
    /// ([`crate::engine::TEMPORARY_LABEL`]), which no request and no
    /// backup index can set: a device of such a name made by an older
    /// version is never taken for a leftover.
    pub fn sweep_restore_leftovers(&self) -> usize {
        let mut n = 0;
        for img in self.engine.images().unwrap_or_default() {
            for s in self.engine.snapshots_of(img.id).unwrap_or_default() {
                if s.name.as_str().starts_with(HEAD)
                    && crate::engine::is_temporary(&s, "backup-head")
                {
                    match self.engine.destroy_id(s.id) {
                        Ok(()) => {
                            log::warn!(
                                "destroyed {}@{}, left by a backup that did not finish",
                                img.name,
                                s.name
                            );
                            n += 1;
                        }
                        Err(e) => log::error!(
                            "cannot destroy {}@{}, left by a backup: {e}",
                            img.name,
                            s.name
                        ),
                    }
                }
            }
            if !img.name.as_str().starts_with(RESTORE_PREFIX)
                || !crate::engine::is_temporary(&img, "restore")
            {
                continue;
            }
            let t = Target {
                image: img.name.clone(),
                snap: None,
            };
            match self.engine.destroy(&t, true) {
                Ok(()) => {
                    log::warn!(
                        "destroyed {}, left by a restore that did not finish",
                        img.name
                    );
                    n += 1;
                }
                Err(e) => log::error!("cannot destroy {}, left by a restore: {e}", img.name),
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    //! Property tests of the backup reader (outside input): any mutation
    //! of a valid file, or of its index with the trailer's hash made right
    //! again, is refused with EBADMSG; a valid file verifies to its index.

    use super::*;
    use crate::stream::props::{apply, mutation};
    use proptest::prelude::*;

    /// A backup file of these sections (their bytes: `verify` checks only
    /// hashes), with `index` edited by `edit` before it is sealed.
    fn file_of(sections: &[Vec<u8>], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        let mut secs = Vec::new();
        let n = sections.len();
        for (i, s) in sections.iter().enumerate() {
            secs.push(Section {
                name: format!("s{i}"),
                head: i + 1 == n,
                identity: String::new(),
                base: None,
                size: 1 << 30,
                created: 0,
                labels: BTreeMap::new(),
                offset: b.len() as u64,
                length: s.len() as u64,
                hashes: s
                    .chunks(CHUNK as usize)
                    .map(|c| blake3::hash(c).to_hex().to_string())
                    .collect(),
            });
            b.extend_from_slice(s);
        }
        let idx = BackupIndex {
            image: "img".into(),
            backend: "reflink".into(),
            created: 0,
            labels: BTreeMap::new(),
            sections: secs,
        };
        let mut v = serde_json::to_value(&idx).unwrap();
        edit(&mut v);
        let json = serde_json::to_vec(&v).unwrap();
        b.extend_from_slice(&json);
        b.extend_from_slice(&(json.len() as u64).to_le_bytes());
        b.extend_from_slice(blake3::hash(&json).as_bytes());
        b.extend_from_slice(END);
        b
    }

    fn verify(bytes: &[u8]) -> Result<BackupIndex> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("thinfs-bkprops-{}-{n}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        let mut f = File::open(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        verify_file(&mut f, |_| {})
    }

    fn sections() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..4)
    }

    /// A number that hurts, for an index field.
    fn huge() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(u64::MAX),
            Just(1u64 << 63),
            Just(1u64 << 40),
            Just(u64::MAX - 15),
            0u64..2000
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn files_verify_and_mutations_are_refused(
            secs in sections(),
            ms in prop::collection::vec(mutation(), 1..3),
        ) {
            let good = file_of(&secs, |_| {});
            let idx = verify(&good).unwrap();
            prop_assert_eq!(idx.sections.len(), secs.len());
            let mut b = good.clone();
            for m in &ms {
                apply(&mut b, m);
            }
            match verify(&b) {
                Ok(_) => prop_assert!(b == good, "a changed file verified"),
                Err(e) => prop_assert_eq!(e.errno(), libc::EBADMSG, "{}", e),
            }
        }

        #[test]
        fn crafted_indexes_are_refused(
            secs in sections(),
            which in 0usize..4,
            field in prop::sample::select(vec!["offset", "length", "hashes", "head"]),
            v in huge(),
        ) {
            let b = file_of(&secs, |j| {
                let s = &mut j["sections"][which % secs.len()];
                s[field] = match field {
                    "hashes" => serde_json::json!(vec!["00"; (v % 5) as usize]),
                    "head" => serde_json::json!(v % 2 == 0),
                    _ => serde_json::json!(v),
                };
            });
            match verify(&b) {
                Ok(idx) => {
                    // Only a change that keeps the file's truth passes.
                    for (s, data) in idx.sections.iter().zip(&secs) {
                        prop_assert_eq!(s.length, data.len() as u64);
                    }
                }
                Err(e) => prop_assert_eq!(e.errno(), libc::EBADMSG, "{}", e),
            }
        }
    }

    /// Labels a `label` request could not set (found in the audit: restore
    /// stored them as they came) are refused before anything is made.
    #[test]
    fn labels_are_checked_like_requests() {
        for (k, v) in [
            ("", 1),
            ("a=b", 1),
            ("a\0", 1),
            (&"k".repeat(256)[..], 1),
            ("k", MAX_LABEL_VALUE + 1),
        ] {
            let b = file_of(&[vec![1; 10]], |j| {
                j["sections"][0]["labels"] = serde_json::json!({ k: "v".repeat(v) });
            });
            let e = verify(&b).unwrap_err();
            assert!(e.to_string().contains("label"), "{e}");
            let b = file_of(&[vec![1; 10]], |j| {
                j["labels"] = serde_json::json!({ k: "v".repeat(v) });
            });
            assert!(verify(&b).is_err());
        }
        let b = file_of(&[vec![1; 10]], |j| {
            j["labels"] = serde_json::json!({ "k": "v".repeat(MAX_LABEL_VALUE) });
        });
        verify(&b).unwrap();
    }

    /// The file, small: a trailer that claims an index longer than
    /// the bound (or the file) is refused before anything is read.
    #[test]
    fn index_lengths_are_bounded() {
        let good = file_of(&[vec![1; 100]], |_| {});
        let at = good.len() - END.len() - 40;
        for ilen in [u64::MAX, MAX_INDEX + 1, good.len() as u64] {
            let mut b = good.clone();
            b[at..at + 8].copy_from_slice(&ilen.to_le_bytes());
            let e = verify(&b).unwrap_err();
            assert!(e.to_string().contains("index length is damaged"), "{e}");
        }
    }
}
