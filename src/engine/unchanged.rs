//! Has an image changed since its newest snapshot? Compared on the block
//! level (the backend's changed ranges, then the bytes in them), ignoring
//! what mounting, reading and cleanly unmounting ext4 writes by itself: the
//! primary superblock (mount count and times), the journal (a clean
//! journal's content is never read again), and in inode tables the access
//! times and the inode checksums that cover them. Measured on this machine:
//! a mount, reads of every file and an unmount differ from the snapshot
//! only there. The image must be offline (no mount), so its journal is
//! clean. A change of anything else (a mode, an owner, a byte of data, a
//! name) is a change.

use super::Engine;
use crate::error::{IoContext, Result};
use crate::meta::DeviceRecord;
use std::os::unix::fs::FileExt;

/// What a mount alone rewrites in an ext4 filesystem.
#[derive(Debug, Default)]
struct Noise {
    /// Whole byte ranges (superblock, journal).
    ranges: Vec<(u64, u64)>,
    /// Inode tables (start, end) and the inode size.
    itables: Vec<(u64, u64)>,
    inode_size: u64,
}

/// Fields of an inode that reading it changes: i_atime, the checksum
/// (lo, hi), i_atime_extra.
const ATIME_FIELDS: [(u64, u64); 4] = [(0x08, 0x0C), (0x7C, 0x7E), (0x82, 0x84), (0x8C, 0x90)];

fn mount_noise(dev: &std::fs::File) -> Noise {
    let mut n = Noise {
        ranges: vec![(1024, 2048)],
        ..Noise::default()
    };
    let mut sb = [0u8; 1024];
    if dev.read_exact_at(&mut sb, 1024).is_err() || sb[0x38..0x3A] != [0x53, 0xEF] {
        return n;
    }
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]) as u64;
    let bs = 1024u64 << u32_at(0x18).min(6);
    inode_tables(dev, &sb, bs, &mut n);
    n.ranges.extend(journal(&sb, bs));
    n
}

/// Where the inode tables are (from the group descriptors).
fn inode_tables(dev: &std::fs::File, sb: &[u8; 1024], bs: u64, n: &mut Noise) {
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]) as u64;
    let is64 = u32_at(0x60) & 0x80 != 0;
    let desc = if is64 {
        (u16::from_le_bytes([sb[0xFE], sb[0xFF]]) as u64).max(32)
    } else {
        32
    };
    let blocks = u32_at(0x04) | if is64 { u32_at(0x150) << 32 } else { 0 };
    let (first, per_group, ipg) = (u32_at(0x14), u32_at(0x20), u32_at(0x28));
    let isz = u16::from_le_bytes([sb[0x58], sb[0x59]]) as u64;
    if per_group == 0 || isz < 0x90 || blocks <= first {
        return;
    }
    let groups = (blocks - first).div_ceil(per_group);
    let mut gdt = vec![0u8; (groups * desc) as usize];
    if groups > 1 << 20 || dev.read_exact_at(&mut gdt, (first + 1) * bs).is_err() {
        return;
    }
    n.inode_size = isz;
    for g in gdt.chunks(desc as usize) {
        let lo = u32::from_le_bytes([g[8], g[9], g[10], g[11]]) as u64;
        let hi = if desc >= 64 {
            u32::from_le_bytes([g[0x28], g[0x29], g[0x2A], g[0x2B]]) as u64
        } else {
            0
        };
        let start = (lo | hi << 32) * bs;
        n.itables.push((start, start + ipg * isz));
    }
}

/// The journal's extents, from the superblock's copy of its inode's
/// block map.
fn journal(sb: &[u8; 1024], bs: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    // s_jnl_backup_type 1: s_jnl_blocks holds the journal inode's i_block.
    if sb[0xFD] != 1 {
        return v;
    }
    let ib = &sb[0x10C..0x10C + 60];
    let u16_at = |o: usize| u16::from_le_bytes([ib[o], ib[o + 1]]);
    let (magic, entries, depth) = (u16_at(0), u16_at(2), u16_at(6));
    if magic != 0xF30A || depth != 0 {
        return v;
    }
    for i in 0..(entries as usize).min(4) {
        let e = 12 + 12 * i;
        let len = (u16_at(e + 4) & 0x7FFF) as u64;
        let start = ((u16_at(e + 6) as u64) << 32)
            | u32::from_le_bytes([ib[e + 8], ib[e + 9], ib[e + 10], ib[e + 11]]) as u64;
        v.push((start * bs, (start + len) * bs));
    }
    v
}

fn in_noise(n: &Noise, pos: u64) -> bool {
    n.ranges.iter().any(|&(a, b)| a <= pos && pos < b)
        || n.itables.iter().any(|&(a, b)| {
            a <= pos && pos < b && {
                let off = (pos - a) % n.inode_size;
                ATIME_FIELDS.iter().any(|&(x, y)| x <= off && off < y)
            }
        })
}

impl Engine {
    /// `None` if `img` holds what `snap` holds (up to mount noise); else
    /// the first changed offset, for the message.
    pub(super) fn changed_since(
        &self,
        img: &DeviceRecord,
        snap: &DeviceRecord,
    ) -> Result<Option<u64>> {
        if img.size != snap.size {
            return Ok(Some(snap.size.0.min(img.size.0)));
        }
        let ranges = self
            .backend
            .changed_ranges(Some(snap.dev), img.dev, img.size)?;
        if ranges.is_empty() {
            return Ok(None);
        }
        // The snapshot may be mounted (a user browsing it): read it through
        // its live device where the backend allows one activation only.
        let ir = self.backend.open_read(img.dev, img.size)?;
        let sr = self.backend.open_read(snap.dev, snap.size)?;
        let (fi, fs) = (&ir.file, &sr.file);
        let noise = mount_noise(fi);
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        for r in ranges {
            let mut off = r.offset;
            while off < r.offset + r.len {
                let n = ((r.offset + r.len - off) as usize).min(a.len());
                fi.read_exact_at(&mut a[..n], off)
                    .ctx(|| "read the image".into())?;
                fs.read_exact_at(&mut b[..n], off)
                    .ctx(|| "read the snapshot".into())?;
                if a[..n] != b[..n] {
                    for i in 0..n {
                        if a[i] != b[i] && !in_noise(&noise, off + i as u64) {
                            return Ok(Some(off + i as u64));
                        }
                    }
                }
                off += n as u64;
            }
        }
        Ok(None)
    }
}
