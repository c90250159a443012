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
    /// Bytes of data ranges.
    pub data_bytes: u64,
    /// Bytes of zero ranges.
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
        stats.bytes = pipeline(&dev_file, &ranges, header, out, progress)?;
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

/// reader -> encoder -> writer over bounded channels. Returns stream bytes.
fn pipeline(
    dev: &std::fs::File,
    ranges: &[ChangedRange],
    header: StreamHeader,
    out: &mut (dyn Write + Send),
    progress: &dyn Progress,
) -> Result<u64> {
    let (ptx, prx): (Sender<Result<Piece>>, Receiver<Result<Piece>>) = bounded(4);
    let (btx, brx): (Sender<Vec<u8>>, Receiver<Vec<u8>>) = bounded(4);
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            for r in ranges {
                let piece = match r.kind {
                    RangeKind::Zero => Ok(Piece::Zero(r.offset, r.len)),
                    RangeKind::Data => {
                        let mut off = r.offset;
                        let end = r.offset + r.len;
                        let mut last = Ok(Piece::Zero(0, 0));
                        while off < end {
                            let n = ((end - off) as usize).min(MAX_DATA);
                            let mut b = vec![0u8; n];
                            match dev.read_exact_at(&mut b, off) {
                                Ok(()) => {}
                                Err(e) => {
                                    last = Err(Error::io(format!("read the snapshot at {off}"), e));
                                    break;
                                }
                            }
                            off += n as u64;
                            if off < end {
                                if ptx.send(Ok(Piece::Data(off - n as u64, b))).is_err() {
                                    return;
                                }
                            } else {
                                last = Ok(Piece::Data(off - n as u64, b));
                            }
                        }
                        last
                    }
                };
                let stop = piece.is_err();
                if ptx.send(piece).is_err() || stop {
                    return;
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
        let _ = reader.join();
        res?;
        enc_res?;
        out.flush().ctx(|| "flush the stream".into())?;
        Ok(written)
    })
}
