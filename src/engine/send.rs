//! Send: a snapshot (or its difference from an older snapshot of the same
//! image) as a block-level stream.
//!
//! Steps: the snapshot (and the base) are cloned into hidden devices (the
//! meta `receiving` tree knows them, no record shows them), so a destroy of
//! the snapshot during a long send neither waits nor breaks it; the backend
//! lists the changed ranges; a reader thread reads them from the hidden
//! snapshot's block device, an encoder thread checksums and frames them,
//! and the calling thread writes the stream. The hidden devices are deleted
//! at the end, whatever happened (a crash: at the next open).
//!
//! Zeros: the reader looks at every 4 KiB block of a data range; a block
//! of zeros is no data (allocated zeros are common: `dd if=/dev/zero`,
//! preallocated files, and on dm whole 64 KiB thin blocks around a small
//! change). Neighbouring zero blocks (and zero ranges) become one zero
//! record of an incremental stream: the base may hold data there. A FULL
//! stream leaves them out: its receiver writes into a fresh device that
//! reads zeros wherever nothing was written (reflink: a new sparse file;
//! dm: `create_thin`, on a pool with block zeroing on, so a block that a
//! partial write provisions reads zeros around it), also when a resumed
//! receive continues one (what was written there came from the same
//! snapshot). The check stops at the first non-zero 64 bytes, so random
//! data costs next to nothing.

use super::Engine;
use crate::backend::{ChangedRange, RangeKind};
use crate::error::{Error, IoContext, Result};
use crate::meta::{DeviceKind, DeviceRecord};
use crate::stream::{Encoder, FLAG_LZ4, FLAG_RESUME, MAX_DATA, Resume, StreamHeader};
use crate::types::{Bytes, DeviceId};
use crossbeam_channel::{Receiver, Sender, bounded};
use std::io::Write;
use std::os::unix::fs::FileExt;

/// Progress and cancellation of a long engine operation, supplied by the
/// layer above (the service's `Job`).
pub trait Progress: Sync {
    /// The whole operation moves about `n` bytes.
    fn total(&self, n: u64);
    /// `n` more bytes done; an error (cancelled) stops the operation.
    fn advance(&self, n: u64) -> Result<()>;
}

/// What a send did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SendStats {
    /// Stream bytes written.
    pub bytes: u64,
    /// Ranges sent.
    pub ranges: u64,
    /// Bytes sent as data.
    pub data_bytes: u64,
    /// Bytes that read as zeros: zero records of an incremental stream,
    /// left out of a full one.
    pub zero_bytes: u64,
    /// Identity of the base snapshot, if incremental.
    pub base_id: Option<String>,
}

/// Block size of every stream this engine writes.
pub const STREAM_BLOCK: u32 = 4096;

/// Hidden devices of one operation, deleted on drop unless published.
pub(super) struct Hidden<'a> {
    engine: &'a Engine,
    pub(super) devs: Vec<DeviceId>,
}

impl<'a> Hidden<'a> {
    pub(super) fn new(engine: &'a Engine) -> Hidden<'a> {
        Hidden {
            engine,
            devs: Vec::new(),
        }
    }

    /// A new hidden device: an empty one of `size`, or a clone of `origin`.
    pub(super) fn make(&mut self, origin: Option<DeviceId>, size: Bytes) -> Result<DeviceId> {
        let e = self.engine;
        let dev = {
            let _g = e.alloc.lock();
            let dev = e.alloc_dev()?;
            e.meta.receiving_add(dev)?;
            dev
        };
        self.devs.push(dev);
        match origin {
            None => e.backend.create(dev, size)?,
            Some(o) => {
                e.backend.snapshot(o, dev)?;
                e.backend.resize(dev, size)?;
            }
        }
        Ok(dev)
    }

    /// The devices were published (the caller's transaction removed them
    /// from `receiving`): nothing to delete.
    pub(super) fn published(mut self) {
        self.devs.clear();
    }
}

impl Drop for Hidden<'_> {
    fn drop(&mut self) {
        for dev in self.devs.drain(..) {
            let r = self
                .engine
                .backend
                .delete(dev)
                .and_then(|_| self.engine.meta.txn(|t| t.receiving_done(dev)));
            if let Err(e) = r {
                log::error!("cannot delete hidden device {dev} ({e}); the next open does");
            }
        }
    }
}

/// A writer that hands full buffers to the next pipeline stage.
struct ChanWriter {
    buf: Vec<u8>,
    tx: Sender<Vec<u8>>,
}

impl Write for ChanWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= MAX_DATA {
            self.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let b = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_DATA + 64));
            self.tx
                .send(b)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    }
}

enum Piece {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Granularity of zero detection: the stream's block.
const ZERO_BLOCK: usize = STREAM_BLOCK as usize;

/// Whether every byte of `b` is zero. Random data fails on its first
/// 64 bytes; a 64-byte OR compiles to a few vector instructions.
fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// The reader stage's output: runs of data blocks as data pieces, runs of
/// zero blocks merged with their zero neighbours into one zero piece, or
/// dropped with `omit_zeros`. Pieces leave in increasing device order.
struct Pieces {
    tx: Sender<Result<Piece>>,
    omit_zeros: bool,
    /// The zero run not yet handed on.
    zero: Option<(u64, u64)>,
    data_bytes: u64,
    zero_bytes: u64,
}

impl Pieces {
    /// Hand on the pending zero run; false once the encoder is gone.
    fn flush(&mut self) -> bool {
        match self.zero.take() {
            Some((o, l)) => self.tx.send(Ok(Piece::Zero(o, l))).is_ok(),
            None => true,
        }
    }

    /// Zeros over `offset..offset+len`.
    fn zero(&mut self, offset: u64, len: u64) -> bool {
        self.zero_bytes += len;
        if self.omit_zeros {
            return true;
        }
        match &mut self.zero {
            Some((o, l)) if *o + *l == offset => {
                *l += len;
                true
            }
            _ => {
                let go = self.flush();
                self.zero = Some((offset, len));
                go
            }
        }
    }

    fn data(&mut self, offset: u64, b: Vec<u8>) -> bool {
        self.data_bytes += b.len() as u64;
        self.flush() && self.tx.send(Ok(Piece::Data(offset, b))).is_ok()
    }

    /// Bytes read at `offset`, split into runs of data and zero blocks.
    fn chunk(&mut self, offset: u64, b: Vec<u8>) -> bool {
        // (start, end, zero) of each run, in bytes of `b`.
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        for (i, blk) in b.chunks(ZERO_BLOCK).enumerate() {
            let (s, z) = (i * ZERO_BLOCK, is_zero(blk));
            match runs.last_mut() {
                Some(r) if r.2 == z => r.1 = s + blk.len(),
                _ => runs.push((s, s + blk.len(), z)),
            }
        }
        if let [(_, _, false)] = runs[..] {
            return self.data(offset, b);
        }
        runs.into_iter().all(|(s, e, z)| {
            let o = offset + s as u64;
            if z {
                self.zero(o, (e - s) as u64)
            } else {
                self.data(o, b[s..e].to_vec())
            }
        })
    }
}

impl Engine {
    /// Check that `snap` is a snapshot and `base` an older snapshot of the
    /// same image; both need identities.
    fn send_pair(&self, snap: &DeviceRecord, base: Option<&DeviceRecord>) -> Result<()> {
        if snap.kind != DeviceKind::Snapshot || snap.identity.is_none() {
            return Err(Error::Invalid(format!(
                "{} is not a snapshot: send takes NAME@SNAP",
                self.full_name(snap)
            )));
        }
        if let Some(b) = base
            && (b.kind != DeviceKind::Snapshot
                || b.parent != snap.parent
                || b.seq >= snap.seq
                || b.identity.is_none())
        {
            return Err(Error::Invalid(format!(
                "{} is not an older snapshot of the same image as {}",
                self.full_name(b),
                self.full_name(snap)
            )));
        }
        Ok(())
    }

    /// Write `snap` as a stream to `out`: full, or incremental from `base`;
    /// with `compress`, data records that shrink go LZ4-compressed.
    pub fn send_stream(
        &self,
        snap: &DeviceRecord,
        base: Option<&DeviceRecord>,
        compress: bool,
        out: &mut (dyn Write + Send),
        progress: &dyn Progress,
    ) -> Result<SendStats> {
        self.send_from(snap, base, compress, None, out, progress)
    }

    /// [`Self::send_stream`], or with `resume` the part of the stream at
    /// and above its offset, as a resuming stream (`send -t`).
    pub(super) fn send_from(
        &self,
        snap: &DeviceRecord,
        base: Option<&DeviceRecord>,
        compress: bool,
        resume: Option<Resume>,
        out: &mut (dyn Write + Send),
        progress: &dyn Progress,
    ) -> Result<SendStats> {
        self.send_pair(snap, base)?;
        let mut hidden = Hidden::new(self);
        // Clone both under their locks: from then on a destroy is free to go.
        let s_dev = {
            let lock = self.lock_of(snap.id);
            let _g = lock.lock();
            let snap = self.ready(snap.id)?;
            hidden.make(Some(snap.dev), snap.size)?
        };
        let b_dev = match base {
            Some(b) => {
                let lock = self.lock_of(b.id);
                let _g = lock.lock();
                let b = self.ready(b.id)?;
                Some(hidden.make(Some(b.dev), b.size)?)
            }
            None => None,
        };
        let mut ranges = self.backend.changed_ranges(b_dev, s_dev, snap.size)?;
        if let Some(r) = &resume {
            // Only what lies at or above the offset: a range across it is
            // cut there (offsets are block-aligned on both sides).
            ranges.retain_mut(|c| {
                if c.offset + c.len <= r.offset {
                    return false;
                }
                if c.offset < r.offset {
                    c.len -= r.offset - c.offset;
                    c.offset = r.offset;
                }
                true
            });
        }
        let header = StreamHeader {
            flags: if compress { FLAG_LZ4 } else { 0 }
                | if resume.is_some() { FLAG_RESUME } else { 0 },
            resume,
            snap_name: snap.name.to_string(),
            snap_id: snap
                .identity
                .ok_or_else(|| Error::Invalid("no identity".into()))?,
            base_id: base.and_then(|b| b.identity),
            size: snap.size.0,
            block_size: STREAM_BLOCK,
        };
        let header_resumed = header.resume.is_some();
        let mut stats = SendStats {
            base_id: base.and_then(|b| b.identity).map(|i| i.to_string()),
            ..SendStats::default()
        };
        for r in &ranges {
            stats.ranges += 1;
            match r.kind {
                RangeKind::Data => stats.data_bytes += r.len,
                RangeKind::Zero => stats.zero_bytes += r.len,
            }
        }
        progress.total(stats.data_bytes);
        let active = self.backend.activate(s_dev, snap.size, true)?;
        let dev_file = std::fs::File::open(active.path())
            .ctx(|| format!("open {}", active.path().display()))?;
        let (bytes, data, zero) =
            pipeline(&dev_file, &ranges, header, base.is_none(), out, progress)?;
        stats.bytes = bytes;
        stats.data_bytes = data;
        stats.zero_bytes = zero;
        drop(dev_file);
        drop(active);
        drop(hidden);
        log::info!(
            "sent {} ({}{}): {} ranges, {} data, {} zero, {} stream bytes",
            self.full_name(snap),
            if base.is_some() {
                "incremental"
            } else {
                "full"
            },
            if header_resumed { ", resumed" } else { "" },
            stats.ranges,
            Bytes(stats.data_bytes),
            Bytes(stats.zero_bytes),
            stats.bytes
        );
        Ok(stats)
    }
}

/// reader -> encoder -> writer over bounded channels. With `omit_zeros`
/// (a full stream) zeros go nowhere. Returns the stream bytes, the bytes
/// sent as data and the bytes found zero.
fn pipeline(
    dev: &std::fs::File,
    ranges: &[ChangedRange],
    header: StreamHeader,
    omit_zeros: bool,
    out: &mut (dyn Write + Send),
    progress: &dyn Progress,
) -> Result<(u64, u64, u64)> {
    let (ptx, prx): (Sender<Result<Piece>>, Receiver<Result<Piece>>) = bounded(4);
    let (btx, brx): (Sender<Vec<u8>>, Receiver<Vec<u8>>) = bounded(4);
    // A panic of the reader must reach the encoder as an error: else its
    // channel would just end and the encoder would close a cut stream
    // with a valid end record.
    let ptx_panic = ptx.clone();
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let body = move || {
                super::panic_point("send.reader-panic");
                let mut out = Pieces {
                    tx: ptx,
                    omit_zeros,
                    zero: None,
                    data_bytes: 0,
                    zero_bytes: 0,
                };
                for r in ranges {
                    let go = match r.kind {
                        RangeKind::Zero => out.zero(r.offset, r.len),
                        RangeKind::Data => {
                            let mut off = r.offset;
                            let end = r.offset + r.len;
                            let mut go = true;
                            while go && off < end {
                                let n = ((end - off) as usize).min(MAX_DATA);
                                let mut b = vec![0u8; n];
                                if let Err(e) = dev.read_exact_at(&mut b, off) {
                                    let e = Error::io(format!("read the snapshot at {off}"), e);
                                    let _ = out.tx.send(Err(e));
                                    return (0, 0);
                                }
                                go = out.chunk(off, b);
                                off += n as u64;
                            }
                            go
                        }
                    };
                    if !go {
                        return (0, 0);
                    }
                }
                out.flush();
                (out.data_bytes, out.zero_bytes)
            };
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                Ok(counts) => counts,
                Err(_) => {
                    log::error!("the stream reader panicked (a bug); the stream is cut");
                    let _ = ptx_panic.send(Err(Error::io(
                        "read the snapshot",
                        std::io::Error::other("the reader thread panicked"),
                    )));
                    (0, 0)
                }
            }
        });
        let encoder = s.spawn(move || -> Result<()> {
            let w = ChanWriter {
                buf: Vec::with_capacity(MAX_DATA + 64),
                tx: btx,
            };
            let mut enc = Encoder::new(w, header)?;
            // Consecutive data pieces of one range are one encoder call each.
            for p in prx {
                match p? {
                    Piece::Data(o, b) => enc.data(o, &b)?,
                    Piece::Zero(o, l) => enc.zero(o, l)?,
                }
            }
            let (mut w, _, _) = enc.finish()?;
            w.flush().ctx(|| "hand over the stream".into())
        });
        let mut written = 0u64;
        let mut res: Result<()> = Ok(());
        for b in brx.iter() {
            if let Err(e) = out.write_all(&b) {
                res = Err(Error::io("write the stream", e));
                break;
            }
            written += b.len() as u64;
            if let Err(e) = progress.advance(b.len() as u64) {
                res = Err(e);
                break;
            }
        }
        drop(brx);
        let enc_res = encoder
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("stream encoder panicked".into())));
        let counts = reader.join().unwrap_or((0, 0));
        res?;
        enc_res?;
        out.flush().ctx(|| "flush the stream".into())?;
        Ok((written, counts.0, counts.1))
    })
}
