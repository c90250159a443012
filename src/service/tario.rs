//! Byte-level pieces of reading a tar stream for `thinfs import`: the
//! input reader that sees a cancel and counts progress, end-of-input
//! detection, and PAX records and times (parsed here because binary ACL
//! values hold newlines that the tar crate's PAX parser splits on).

use super::Job;
use crate::error::{Error, Result};
use crate::sys::{file, scm};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;

/// The input: checks the job before each read and waits for a pipe in
/// short polls, so that a cancel is seen even when nothing comes; counts
/// the bytes read as the job's progress.
pub struct JobReader<'a> {
    inp: File,
    nonblocking: bool,
    job: &'a Job,
}

impl<'a> JobReader<'a> {
    /// Wrap `inp`. A pipe or fifo is reopened as a new open file
    /// description with O_NONBLOCK (the sender's stays as it was).
    pub fn new(inp: File, job: &'a Job) -> Result<JobReader<'a>> {
        let st = file::fstat(inp.as_fd()).map_err(|e| Error::io("stat the input", e))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO => {
                let nb = file::reopen(inp.as_fd(), libc::O_RDONLY | libc::O_NONBLOCK)
                    .map_err(|e| Error::io("reopen the input pipe", e))?;
                Ok(JobReader {
                    inp: nb,
                    nonblocking: true,
                    job,
                })
            }
            libc::S_IFREG => {
                job.set_total(Some(st.st_size.max(0) as u64));
                Ok(JobReader {
                    inp,
                    nonblocking: false,
                    job,
                })
            }
            libc::S_IFDIR => Err(Error::Invalid(
                "the input is a directory: the client sends a tar stream".into(),
            )),
            _ => Ok(JobReader {
                inp,
                nonblocking: false,
                job,
            }),
        }
    }
}

impl Read for JobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.job.is_cancelled() {
                // Not ErrorKind::Interrupted: io::copy and read_exact retry
                // those forever.
                return Err(io::Error::other("the import was cancelled"));
            }
            match self.inp.read(buf) {
                Ok(n) => {
                    self.job.advance(n as u64);
                    return Ok(n);
                }
                Err(e) if self.nonblocking && e.kind() == io::ErrorKind::WouldBlock => {
                    scm::poll_in_or_hup(self.inp.as_fd(), 200)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A reader that notes when its input ended (a read that returned 0).
pub(super) struct EofSeen<R> {
    pub(super) inner: R,
    pub(super) eof: bool,
}

impl<R: Read> Read for EofSeen<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

/// What the entries before a member said about it.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) pax: Vec<(Vec<u8>, Vec<u8>)>,
    pub(super) name: Option<Vec<u8>>,
    pub(super) link: Option<Vec<u8>>,
}

impl Pending {
    pub(super) fn pax_value(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

/// PAX records (`LEN KEY=VALUE\n`, LEN counting the whole record); values
/// may hold any byte, newlines included.
pub(super) fn parse_pax(data: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let bad = || Error::BadStream("malformed PAX record; nothing was imported".into());
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let kv = &rest[sp + 1..len - 1];
        let eq = kv.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        out.push((kv[..eq].to_vec(), kv[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// The content of a small metadata entry (PAX records, a long name).
pub(super) fn read_small<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<u8>> {
    let size = entry.header().size().unwrap_or(u64::MAX);
    if size > 16 << 20 {
        return Err(Error::BadStream(format!(
            "a tar metadata entry of {size} bytes; refused, nothing was imported"
        )));
    }
    let mut v = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut v)
        .map_err(|e| bad_tar("read a metadata entry", e))?;
    if (v.len() as u64) < size {
        return Err(bad_tar(
            "read a metadata entry",
            io::Error::from(io::ErrorKind::UnexpectedEof),
        ));
    }
    Ok(v)
}

pub(super) fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// A damaged or cut archive.
pub(super) fn bad_tar(what: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        // A decompressor's own words say which layer was cut.
        let why = e
            .get_ref()
            .map(|m| m.to_string())
            .unwrap_or_else(|| "the archive ends too early (truncated)".into());
        return Error::BadStream(format!("{what}: {why}; nothing was imported"));
    }
    Error::BadStream(format!("{what}: {e}; nothing was imported"))
}

pub(super) fn pax_num(v: &[u8], what: &str) -> Result<u32> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::BadStream(format!("bad PAX {what}")))
}

/// A PAX time `SECONDS[.FRACTION]` (digits only after the point; more
/// than 9 are cut). `None` for anything else, or a time out of range.
pub(super) fn parse_time(v: &[u8]) -> Option<libc::timespec> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let tv_sec: i64 = sec.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let tv_nsec: i64 = digits.parse().ok()?;
    if sec.starts_with('-') && tv_nsec > 0 {
        // -1.5 means 1.5 s before the epoch.
        return Some(libc::timespec {
            tv_sec: tv_sec.checked_sub(1)?,
            tv_nsec: 1_000_000_000 - tv_nsec,
        });
    }
    Some(libc::timespec { tv_sec, tv_nsec })
}

/// Where a sparse file's data lies: `(offset, length)` segments in order,
/// and the file's size (the rest are holes).
#[derive(Debug, PartialEq)]
pub(super) struct SparseMap {
    pub(super) segments: Vec<(u64, u64)>,
    pub(super) size: u64,
}

impl SparseMap {
    /// Refuse a map whose segments overlap, go backwards or past the end,
    /// or do not add up to the `stored` bytes of data in the archive.
    fn checked(self, path: &[u8], stored: u64) -> Result<SparseMap> {
        let bad = |why: &str| {
            Error::BadStream(format!(
                "sparse entry /{}: {why}; nothing was imported",
                String::from_utf8_lossy(path)
            ))
        };
        let mut end = 0u64;
        let mut total = 0u64;
        for &(off, len) in &self.segments {
            let stop = off
                .checked_add(len)
                .ok_or_else(|| bad("a segment overflows"))?;
            if off < end || stop > self.size {
                return Err(bad("segments overlap or lie past the end of the file"));
            }
            end = stop;
            total = total.saturating_add(len);
        }
        if total != stored {
            return Err(bad(&format!(
                "its map holds {total} bytes of data but the archive {stored}"
            )));
        }
        Ok(self)
    }
}

/// The map of an old GNU sparse entry (type `S`, what `tar -S` writes in
/// GNU format), from its header. The continuation headers of a file of
/// more than 4 segments come between the header and the data, where the
/// tar crate's raw reader does not look for them: such a file is refused.
pub(super) fn gnu_sparse_map(h: &tar::Header, path: &[u8]) -> Result<SparseMap> {
    let bad = |why: &str| {
        Error::BadStream(format!(
            "sparse entry /{}: {why}; nothing was imported",
            String::from_utf8_lossy(path)
        ))
    };
    let gnu = h
        .as_gnu()
        .ok_or_else(|| bad("a sparse type in a header that is not GNU"))?;
    if gnu.is_extended() {
        return Err(bad(
            "an old GNU sparse entry of more than 4 data segments is not read by this import: make the tarball with `tar --format=pax --sparse`",
        ));
    }
    let mut segments = Vec::new();
    for s in gnu.sparse.iter().filter(|s| !s.is_empty()) {
        let off = s.offset().map_err(|_| bad("a bad segment offset"))?;
        let len = s.length().map_err(|_| bad("a bad segment length"))?;
        segments.push((off, len));
    }
    let size = gnu.real_size().map_err(|_| bad("a bad real size"))?;
    let stored = h.entry_size().map_err(|_| bad("a bad size"))?;
    SparseMap { segments, size }.checked(path, stored)
}

/// Most segments a PAX sparse map may list (16 MiB of map at most).
const MAX_SEGMENTS: u64 = 1 << 20;

/// The map at the start of a PAX sparse 1.0 entry's data (what `tar
/// --format=pax --sparse` writes: decimal numbers, one a line: the count,
/// then offset and length of each segment, padded to 512 bytes), read
/// from `r`; `stored` is the entry's size in the archive, `size` the
/// file's (`GNU.sparse.realsize`).
pub(super) fn pax_sparse_map(
    r: &mut impl Read,
    stored: u64,
    size: u64,
    path: &[u8],
) -> Result<SparseMap> {
    let bad = |why: &str| {
        Error::BadStream(format!(
            "sparse entry /{}: {why}; nothing was imported",
            String::from_utf8_lossy(path)
        ))
    };
    let mut text = Vec::new();
    let mut numbers: Vec<u64> = Vec::new();
    let mut parsed = 0;
    loop {
        let mut block = [0u8; 512];
        r.read_exact(&mut block)
            .map_err(|e| bad_tar("read a sparse map", e))?;
        text.extend_from_slice(&block);
        // A number has at most 20 digits: a longer line is no map (and
        // is never rescanned block after block).
        if text.len() - parsed > 512 + 21 && !text[parsed..].contains(&b'\n') {
            return Err(bad("a malformed sparse map (a line too long)"));
        }
        while let Some(nl) = text[parsed..].iter().position(|b| *b == b'\n') {
            let n = std::str::from_utf8(&text[parsed..parsed + nl])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad("a malformed sparse map"))?;
            numbers.push(n);
            parsed += nl + 1;
            if numbers[0] > MAX_SEGMENTS {
                return Err(bad("too many segments in its sparse map"));
            }
            if numbers.len() as u64 == 1 + 2 * numbers[0] {
                let segments = numbers[1..].chunks(2).map(|p| (p[0], p[1])).collect();
                let stored = stored
                    .checked_sub(text.len() as u64)
                    .ok_or_else(|| bad("its sparse map is longer than the entry"))?;
                return SparseMap { segments, size }.checked(path, stored);
            }
        }
        if text.len() as u64 > 24 * MAX_SEGMENTS {
            return Err(bad("its sparse map is too long"));
        }
    }
}
