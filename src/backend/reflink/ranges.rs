//! Changed ranges of a reflink device: walk the FIEMAP extent lists of
//! the snapshot's image file and its base's. A range changed if it is
//! mapped on one side only, its physical address differs, or the
//! UNWRITTEN flag differs. Cost: proportional to the extent counts, not to
//! the device.
//!
//! It knows nothing of the pool: the pool hands it a way to open a
//! device's image file.

use crate::backend::{ChangedRange, RangeKind, normalize};
use crate::error::{IoContext, Result};
use crate::sys::fsio::{self, Extent, FIEMAP_EXTENT_UNWRITTEN};
use crate::types::{Bytes, DeviceId};

/// What one side holds at a point: (physical address there, unwritten).
fn at(ext: &[Extent], i: usize, pos: u64) -> Option<(u64, bool)> {
    let e = ext.get(i)?;
    (e.logical <= pos && pos < e.logical + e.length).then(|| {
        (
            e.physical + (pos - e.logical),
            e.flags & FIEMAP_EXTENT_UNWRITTEN != 0,
        )
    })
}

/// The changed ranges between two extent lists (sorted, non-overlapping).
pub(super) fn diff(base: &[Extent], snap: &[Extent], size: u64) -> Vec<ChangedRange> {
    let mut out = Vec::new();
    let (mut bi, mut si) = (0, 0);
    let mut pos = 0u64;
    while pos < size {
        while bi < base.len() && base[bi].logical + base[bi].length <= pos {
            bi += 1;
        }
        while si < snap.len() && snap[si].logical + snap[si].length <= pos {
            si += 1;
        }
        if bi >= base.len() && si >= snap.len() {
            break;
        }
        // The next point where either side changes.
        let edge = |e: Option<&Extent>| match e {
            Some(e) if e.logical > pos => e.logical,
            Some(e) => e.logical + e.length,
            None => u64::MAX,
        };
        let next = edge(base.get(bi)).min(edge(snap.get(si))).min(size);
        let b = at(base, bi, pos);
        let s = at(snap, si, pos);
        let changed = match (b, s) {
            (None, None) => false,
            (Some((pb, ub)), Some((ps, us))) => pb != ps || ub != us,
            _ => true,
        };
        if changed {
            let kind = match s {
                Some((_, false)) => RangeKind::Data,
                _ => RangeKind::Zero,
            };
            out.push(ChangedRange {
                offset: pos,
                len: next - pos,
                kind,
            });
        }
        pos = next;
    }
    normalize(out, size)
}

/// The changed ranges of `snap` since `base` (all of its data for none),
/// reading the image files that `open` opens read-only.
pub(super) fn changed(
    open: impl Fn(DeviceId) -> std::io::Result<std::fs::File>,
    base: Option<DeviceId>,
    snap: DeviceId,
    size: Bytes,
) -> Result<Vec<ChangedRange>> {
    let extents = |d: DeviceId| -> Result<Vec<Extent>> {
        let f = open(d).ctx(|| format!("open device {d}"))?;
        fsio::fiemap_extents(&f).ctx(|| format!("map extents of device {d}"))
    };
    let s = extents(snap)?;
    let v = match base {
        Some(b) => diff(&extents(b)?, &s, size.0),
        // Full: everything that may hold data; holes and unwritten extents
        // read as zeros on the receiver's fresh device anyway.
        None => diff(&[], &s, size.0)
            .into_iter()
            .filter(|r| r.kind == RangeKind::Data)
            .collect(),
    };
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    fn r(offset: u64, len: u64, kind: RangeKind) -> ChangedRange {
        ChangedRange { offset, len, kind }
    }

    #[test]
    fn diff_of_extent_lists() {
        use RangeKind::*;
        const K: u64 = 4096;
        // base: [0,4K) @100K, [8K,16K) @200K; snap shares the first, has
        // [8K,12K) rewritten elsewhere, [12K,16K) gone (hole), [20K,24K) new,
        // [32K,36K) unwritten.
        let base = [e(0, 100 * K, K, 0), e(2 * K, 200 * K, 2 * K, 0)];
        let snap = [
            e(0, 100 * K, K, 0),
            e(2 * K, 300 * K, K, 0),
            e(5 * K, 400 * K, K, 0),
            e(8 * K, 500 * K, K, FIEMAP_EXTENT_UNWRITTEN),
        ];
        assert_eq!(
            diff(&base, &snap, 64 * K),
            vec![
                r(2 * K, K, Data),
                r(3 * K, K, Zero),
                r(5 * K, K, Data),
                r(8 * K, K, Zero)
            ]
        );
        assert_eq!(diff(&base, &base, 64 * K), vec![]);
        // Shared extent at the same place but a different physical offset
        // within it (an extent split differently) is unchanged.
        let a = [e(0, 100 * K, 4 * K, 0)];
        let b = [e(0, 100 * K, 2 * K, 0), e(2 * K, 102 * K, 2 * K, 0)];
        assert_eq!(diff(&a, &b, 64 * K), vec![]);
    }
}
