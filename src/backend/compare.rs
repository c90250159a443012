//! Changed ranges between two devices: the type every backend returns,
//! and the backend-independent fallback that reads both devices whole.

use super::Backend;
use crate::error::{IoContext, Result};
use crate::types::{Bytes, DeviceId};
use std::os::unix::fs::FileExt;

/// Granularity of changed ranges (and of stream ranges).
pub const BLOCK: u64 = 4096;

/// What a changed range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RangeKind {
    /// Bytes to copy.
    Data,
    /// Reads as zeros (a hole or a discard).
    Zero,
}

/// One logical range of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangedRange {
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Data or zeros.
    pub kind: RangeKind,
}

/// Sort, align to [`BLOCK`] (outward), clip to `size`, merge neighbours of
/// one kind; where ranges of both kinds overlap, the result is `Data`
/// (copying bytes is always correct).
pub fn normalize(mut v: Vec<ChangedRange>, size: u64) -> Vec<ChangedRange> {
    v.sort_by_key(|r| r.offset);
    let mut out: Vec<ChangedRange> = Vec::with_capacity(v.len());
    for r in v {
        let start = r.offset / BLOCK * BLOCK;
        let end = (r.offset + r.len).div_ceil(BLOCK) * BLOCK;
        let end = end.min(size);
        if end <= start {
            continue;
        }
        let mut r = ChangedRange {
            offset: start,
            len: end - start,
            kind: r.kind,
        };
        if let Some(p) = out.last_mut() {
            let pend = p.offset + p.len;
            if r.offset < pend {
                // Overlap: the overlapping part becomes Data.
                if p.kind == r.kind || p.kind == RangeKind::Data {
                    if end > pend {
                        if p.kind == r.kind {
                            p.len = end - p.offset;
                            continue;
                        }
                        r.len = end - pend;
                        r.offset = pend;
                    } else {
                        continue;
                    }
                } else {
                    // p is Zero, r is Data: cut p back, r takes the overlap.
                    p.len = r.offset - p.offset;
                    if end < pend {
                        let tail = ChangedRange {
                            offset: end,
                            len: pend - end,
                            kind: RangeKind::Zero,
                        };
                        if p.len == 0 {
                            out.pop();
                        }
                        out.push(r);
                        out.push(tail);
                        continue;
                    }
                    if p.len == 0 {
                        out.pop();
                    }
                }
            }
        }
        match out.last_mut() {
            Some(p) if p.kind == r.kind && p.offset + p.len == r.offset => p.len += r.len,
            _ => out.push(r),
        }
    }
    out
}

/// Compare `snap` with `base` (or with zeros) by reading both through
/// read-only activations, [`BLOCK`] by block. Proportional to the device.
pub fn compare_by_reading<B: Backend + ?Sized>(
    b: &B,
    base: Option<DeviceId>,
    snap: DeviceId,
    size: Bytes,
) -> Result<Vec<ChangedRange>> {
    let s_dev = b.open_read(snap, size)?;
    let s = &s_dev.file;
    let b_dev = base.map(|d| b.open_read(d, size)).transpose()?;
    let bf = b_dev.as_ref().map(|r| &r.file);
    // A block device's st_size is 0: its length is where its end is.
    let base_len = match bf {
        Some(f) => {
            use std::io::{Seek, SeekFrom};
            let mut f: &std::fs::File = f;
            f.seek(SeekFrom::End(0))
                .ctx(|| format!("length of base device {base:?}"))?
        }
        None => 0,
    };
    const CHUNK: usize = 1 << 20;
    let mut sb = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size.0 {
        let n = ((size.0 - off) as usize).min(CHUNK);
        s.read_exact_at(&mut sb[..n], off)
            .ctx(|| format!("read device {snap} at {off}"))?;
        let have_base = match &bf {
            Some(f) if off < base_len => {
                let m = ((base_len - off) as usize).min(n);
                f.read_exact_at(&mut bb[..m], off)
                    .ctx(|| format!("read base device at {off}"))?;
                bb[m..n].fill(0);
                true
            }
            _ => false,
        };
        for i in (0..n).step_by(BLOCK as usize) {
            let blk = &sb[i..(i + BLOCK as usize).min(n)];
            let zero = blk.iter().all(|&x| x == 0);
            let differs = if have_base {
                blk != &bb[i..(i + BLOCK as usize).min(n)]
            } else {
                !zero
            };
            if differs {
                out.push(ChangedRange {
                    offset: off + i as u64,
                    len: blk.len() as u64,
                    kind: if zero {
                        RangeKind::Zero
                    } else {
                        RangeKind::Data
                    },
                });
            }
        }
        off += n as u64;
    }
    Ok(normalize(out, size.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64, kind: RangeKind) -> ChangedRange {
        ChangedRange { offset, len, kind }
    }

    #[test]
    fn normalize_merges_aligns_and_prefers_data() {
        use RangeKind::*;
        let v = normalize(
            vec![
                r(8192, 4096, Data),
                r(0, 4096, Data),
                r(4096, 4096, Data),
                r(100, 10, Zero),
            ],
            1 << 20,
        );
        assert_eq!(v, vec![r(0, 12288, Data)]);
        let v = normalize(vec![r(0, 16384, Zero), r(4096, 4096, Data)], 1 << 20);
        assert_eq!(
            v,
            vec![r(0, 4096, Zero), r(4096, 4096, Data), r(8192, 8192, Zero)]
        );
        let v = normalize(vec![r(0, 1 << 30, Data)], 1 << 20);
        assert_eq!(v, vec![r(0, 1 << 20, Data)]);
    }
}
