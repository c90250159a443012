//! Has an image changed since its newest snapshot? Compared on the block
//! level (the backend's changed ranges, then the bytes in them), ignoring
//! what mounting and cleanly unmounting ext4 writes by itself: the primary
//! superblock (mount count and times) and the journal (a clean journal's
//! content is never read again). Measured on this machine: a mount and
//! unmount with no file change differs from the snapshot only there. The
//! image must be offline (no mount), so its journal is clean.

use super::Engine;
use crate::error::{IoContext, Result};
use crate::meta::DeviceRecord;
use std::os::unix::fs::FileExt;

/// Byte ranges of an ext4 filesystem that a mount alone rewrites.
fn mount_noise(dev: &std::fs::File) -> Vec<(u64, u64)> {
    let mut v = vec![(1024, 2048)];
    let mut sb = [0u8; 1024];
    if dev.read_exact_at(&mut sb, 1024).is_err() || sb[0x38..0x3A] != [0x53, 0xEF] {
        return v;
    }
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    let bs = 1024u64 << u32_at(0x18).min(6);
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

fn in_noise(noise: &[(u64, u64)], pos: u64) -> bool {
    noise.iter().any(|&(a, b)| a <= pos && pos < b)
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
        let ia = self.backend.activate(img.dev, img.size, true)?;
        let sa = self.backend.activate(snap.dev, snap.size, true)?;
        let fi = std::fs::File::open(ia.path()).ctx(|| format!("open {}", ia.path().display()))?;
        let fs = std::fs::File::open(sa.path()).ctx(|| format!("open {}", sa.path().display()))?;
        let noise = mount_noise(&fi);
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
