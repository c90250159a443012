//! The space guard: a full pool gives writers ENOSPC at `write()` time.
//!
//! Thin pools are overcommitted: the images' virtual sizes add up to more
//! than the pool. A block the pool cannot give used to fail only at
//! writeback, long after `write()` had succeeded: ext4 lost the data or
//! aborted its journal. The guard keeps each writable inner ext4's idea of
//! its free space below what the pool can still give, by raising ext4's
//! `reserved_clusters` (sysfs, effective at once: later allocations fail
//! with ENOSPC in `write()`, before anything reaches the block device), and
//! lowers it again when the pool has room.
//!
//! The same knob caps containerd's writable devices (active snapshots),
//! which containerd mounts itself, in its own mount namespaces: the ext4
//! sysfs directory is per superblock, named after the block device the
//! engine attached, and the free blocks come from statvfs of one of its
//! mounts, found in the processes' mount tables ([`LayerMounts`]). A
//! container that fills the pool gets ENOSPC in `write()` like an image's
//! writer.
//!
//! Nothing here asks the kernel for a superblock by device number
//! (ustat(2), which the guard used before: the 6.1 kernel's lookup
//! rescans its superblock list when it meets a superblock of that device
//! being set up or torn down; it was the suspect, not confirmed, when a dm
//! guest locked up with this thread on a CPU while containerd mounted and
//! unmounted its views). Every call the guard makes goes through a
//! descriptor or a path of a live mount, or sysfs.
//!
//! It owns that sysfs knob, the pool's ok/low/full state, the log
//! warnings at 80 %, 90 % and full, and the repair of an image whose ext4
//! reported errors (`errors_count` in sysfs, e.g. an aborted journal): it
//! logs them at once and runs `e2fsck -fy` (the engine's `fsck`) as soon as
//! the image is no longer mounted. It reaches mounts only through the
//! engine's public API (`live_mounts_all`, `mounted`) and never mounts,
//! unmounts or writes into a filesystem.
//!
//! Accounting, per writable mounted image (bytes):
//! - `pending`: blocks ext4 has handed out (or promised to dirty pages)
//!   that the pool does not back yet: the larger of ext4's delayed
//!   allocations and `ext4 used - (backed - metadata backed when first seen)`;
//! - `hidden`: what ext4 may still write without allocating anything the
//!   guard can stop: the journal plus a metadata margin, twice when the
//!   image shares blocks with a snapshot or origin (copy-on-write of the
//!   journal and metadata blocks).
//!
//! `budget = pool available - margin - sum(pending + hidden)` is shared
//! among the writable images, images that wrote since the last tick
//! getting four times the share of idle ones. ext4 enforces each share
//! itself, synchronously, so writers cannot outrun the guard; the tick only
//! decides how fast a share is rebalanced. A freshly mounted image is not
//! guarded until the next tick: with room in the pool the margin covers
//! that; when the budget is tight its mount waits for the tick ([`Pulse`]).
//! containerd mounts its devices itself, so for those the margin alone
//! covers the first tick after containerd's mount. Not covered: in-place
//! overwrites of data blocks shared with a snapshot (ext4 allocates nothing
//! for them) beyond the margins.

use super::{Engine, Target};
use crate::error::{IoContext, Result};
use crate::meta::DeviceKind;
use crate::types::{Bytes, DeviceId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the guard looks at the pool.
pub const TICK: Duration = Duration::from_millis(25);
/// Kept free in the pool whatever the images need: the pool's own
/// metadata, and what a freshly mounted image can dirty before the first
/// tick sees it (~2 GB/s into the page cache for one tick).
pub const MARGIN: u64 = 128 << 20;
/// Per-image margin for metadata written without allocation (inode tables,
/// bitmaps), on top of the journal.
pub const META_MARGIN: u64 = 16 << 20;

/// How full the pool is, for humans and scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolState {
    /// Below 80 % used.
    #[default]
    Ok,
    /// 80 % used or more.
    Low,
    /// The guard gives writers (almost) nothing more: they get ENOSPC.
    Full,
}

impl std::fmt::Display for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolState::Ok => "ok",
            PoolState::Low => "low",
            PoolState::Full => "full",
        })
    }
}

/// One writable mounted image, as sampled.
#[derive(Debug, Clone)]
struct Sample {
    id: DeviceId,
    sysfs: PathBuf,
    bsize: u64,
    /// ext4 free blocks (delayed allocations already taken off).
    bfree: u64,
    /// ext4 data bytes in use (delayed allocations included).
    used: u64,
    delalloc: u64,
    /// Pool bytes backing the device.
    backed: u64,
    /// Journal plus metadata margin (doubled when sharing blocks).
    hidden: u64,
    errors: u64,
    /// containerd's device (mounted by containerd, not by the engine).
    layer: bool,
}

/// Per-image state kept across ticks.
#[derive(Debug)]
struct Tracked {
    sysfs: PathBuf,
    /// Backed bytes that are not ext4 data when first seen (metadata).
    meta0: i64,
    default_resv: u64,
    last_used: u64,
    written_resv: Option<u64>,
    warned_errors: bool,
}

/// The outcome of one look at the pool.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Pool state.
    pub state: PoolState,
    /// Bytes the guard can still hand to writers (may be negative).
    pub budget: i64,
    /// Percent of the pool in use.
    pub used_percent: f64,
    /// Bytes each writable image may still allocate.
    allowed: Vec<(DeviceId, u64)>,
}

/// mke2fs's default journal size for a filesystem of `size` bytes
/// (4 KiB blocks), as `ext2fs_default_journal_size` picks it.
fn journal_bytes(size: u64) -> u64 {
    let blocks = size / 4096;
    let j = match blocks {
        b if b < 2048 => 0,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    };
    j * 4096
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn ext4_sysfs(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?;
    let p = Path::new("/sys/fs/ext4").join(name);
    p.is_dir().then_some(p)
}

/// Block size and block count of the ext4 on block device `dev`, from its
/// superblock (they do not change while it is mounted).
fn ext4_geometry(dev: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev).ok()?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024).ok()?;
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]) as u64;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let bsize = 1024u64.checked_shl(le32(0x18) as u32)?;
    // s_blocks_count_hi counts only with the 64bit feature (incompat 0x80).
    let hi = if le32(0x60) & 0x80 != 0 {
        le32(0x150)
    } else {
        0
    };
    Some((bsize, (hi << 32) | le32(0x4)))
}

/// Where containerd's writable devices are mounted: for each device
/// number, paths of its mounts as `/proc/PID/root/MOUNTPOINT`, read from
/// the mount table of one root process per mount namespace (containerd,
/// its shims and runc's containers run as root; a user's namespace, where
/// a path could lead through the user's own FUSE mount and stall the
/// guard, is never walked). A path is checked at every use (it must still
/// be a mount of that device); the tables are read again only when a
/// mounted device has no working path, at most every [`RESCAN`].
#[derive(Debug, Default)]
pub(super) struct LayerMounts {
    paths: HashMap<u64, Vec<PathBuf>>,
    scanned: Option<Instant>,
}

/// How often [`LayerMounts`] may read the mount tables (a few namespaces,
/// about a millisecond).
const RESCAN: Duration = Duration::from_millis(200);

impl LayerMounts {
    /// Free blocks of the filesystem on device `rdev`, through a path of
    /// one of its mounts; None when no mount of it is known now.
    fn free_blocks(&mut self, rdev: u64) -> Option<u64> {
        let paths = self.paths.get_mut(&rdev)?;
        while let Some(p) = paths.first() {
            match crate::sys::fsio::statvfs_at_dev(p, rdev) {
                Ok(st) => return Some(st.f_bfree),
                Err(_) => {
                    paths.remove(0);
                }
            }
        }
        None
    }

    /// Keep paths of the devices in `want` only; look for those with no
    /// path in the mount tables (at most every [`RESCAN`]).
    fn refresh(&mut self, want: &[u64]) {
        self.paths.retain(|d, p| want.contains(d) && !p.is_empty());
        if want.iter().all(|d| self.paths.contains_key(d))
            || self.scanned.is_some_and(|t| t.elapsed() < RESCAN)
        {
            return;
        }
        self.scanned = Some(Instant::now());
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut namespaces = std::collections::HashSet::new();
        for e in rd.flatten() {
            let pid = e.file_name();
            let Some(pid) = pid
                .to_str()
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if !runs_as_root(pid) {
                continue;
            }
            let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
                continue;
            };
            if !namespaces.insert(ns) {
                continue;
            }
            let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
                continue;
            };
            for (dev, mp) in table.lines().filter_map(mountinfo_line) {
                if want.contains(&dev) {
                    let p = Path::new("/proc")
                        .join(pid)
                        .join("root")
                        .join(mp.strip_prefix('/').unwrap_or(&mp));
                    let v = self.paths.entry(dev).or_default();
                    if v.len() < 8 {
                        v.push(p);
                    }
                }
            }
        }
    }
}

/// Are process `pid`'s real and effective uids 0 (`/proc/PID/status`;
/// the owner of `/proc/PID` is root for any non-dumpable process)?
fn runs_as_root(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|st| {
            let l = st.lines().find(|l| l.starts_with("Uid:"))?;
            let mut ids = l.split_whitespace().skip(1);
            Some(ids.next()? == "0" && ids.next()? == "0")
        })
        .unwrap_or(false)
}

/// The device number and mount point of one `/proc/PID/mountinfo` line
/// (the mount point unescaped: `\040` is a space).
fn mountinfo_line(l: &str) -> Option<(u64, String)> {
    let mut f = l.split(' ');
    let (_, _, mm, _, mp) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let (ma, mi) = mm.split_once(':')?;
    let dev = libc::makedev(ma.parse().ok()?, mi.parse().ok()?);
    let b = mp.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(o)) => {
                out.push(
                    o.iter()
                        .fold(0u8, |a, c| a.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some((dev, String::from_utf8(out).ok()?))
}

/// Full when the guard can give writers less than this.
const FULL_BELOW: i64 = 64 << 20;

/// Share the pool among the samples. `meta0` gives each image's metadata
/// baseline (None: unknown, count delayed allocations only).
fn plan(
    total: u64,
    available: u64,
    samples: &[Sample],
    meta0: impl Fn(DeviceId) -> Option<i64>,
    active: impl Fn(DeviceId, u64) -> bool,
) -> Plan {
    let mut need: i64 = 0;
    for s in samples {
        let pending = match meta0(s.id) {
            Some(m) => (s.used as i64 - (s.backed as i64 - m)).max(s.delalloc as i64),
            None => s.delalloc as i64,
        }
        .max(0);
        need += pending + s.hidden as i64;
    }
    let budget = available as i64 - MARGIN as i64 - need;
    let used_percent = if total == 0 {
        100.0
    } else {
        (total - available.min(total)) as f64 * 100.0 / total as f64
    };
    let state = if budget < FULL_BELOW {
        PoolState::Full
    } else if used_percent >= 80.0 {
        PoolState::Low
    } else {
        PoolState::Ok
    };
    let weights: Vec<u64> = samples
        .iter()
        .map(|s| if active(s.id, s.used) { 4 } else { 1 })
        .collect();
    let sum: u64 = weights.iter().sum::<u64>().max(1);
    let give = budget.max(0) as u64;
    let allowed = samples
        .iter()
        .zip(&weights)
        .map(|(s, w)| (s.id, (give as u128 * *w as u128 / sum as u128) as u64))
        .collect();
    Plan {
        state,
        budget,
        used_percent,
        allowed,
    }
}

impl Engine {
    /// Size and block sharing of an image (from its records).
    fn space_shape(&self, id: DeviceId) -> Option<(u64, bool)> {
        let r = self.record(id).ok()?;
        let snaps = self.snapshots_of(id).map(|s| !s.is_empty()).unwrap_or(true);
        Some((
            r.size.0,
            snaps
                || (matches!(r.kind, DeviceKind::Image | DeviceKind::Containerd)
                    && r.parent.is_some()),
        ))
    }

    /// Sample every writable mounted image (ext4 only). `shape` gives an
    /// image's size and whether it shares blocks (cached by the watcher).
    /// `cached` may hand back the previous sample of an image whose free
    /// block count has not changed (saves the other reads).
    fn space_samples(
        &self,
        mut shape: impl FnMut(DeviceId) -> Option<(u64, bool)>,
        cached: impl Fn(DeviceId, &Path, u64) -> Option<Sample>,
        layer_mounts: &mut LayerMounts,
    ) -> Vec<Sample> {
        let mut v = Vec::new();
        for m in self.live_mounts_all() {
            let id = m.id;
            if m.read_only {
                continue;
            }
            let Some(sysfs) = ext4_sysfs(m.device().path()) else {
                continue;
            };
            let Ok(st) = crate::sys::fsio::statvfs(m.root()) else {
                continue;
            };
            if let Some(prev) = cached(id, &sysfs, st.f_bfree) {
                v.push(prev);
                continue;
            }
            let Ok(backed) = self.backend.allocated(m.dev) else {
                continue;
            };
            let Some((size, shares)) = shape(id) else {
                continue;
            };
            let bsize = st.f_frsize.max(1);
            let delalloc = read_u64(&sysfs.join("delayed_allocation_blocks")).unwrap_or(0) * bsize;
            let one = journal_bytes(size) + META_MARGIN;
            v.push(Sample {
                id,
                bfree: st.f_bfree,
                used: (st.f_blocks - st.f_bfree.min(st.f_blocks)) * bsize,
                bsize,
                delalloc,
                backed,
                hidden: if shares { 2 * one } else { one },
                errors: read_u64(&sysfs.join("errors_count")).unwrap_or(0),
                sysfs,
                layer: false,
            });
        }
        let mut layers = Vec::new();
        for w in self.layer_writables() {
            let Some(sysfs) = ext4_sysfs(&w.path) else {
                // Not mounted by containerd (yet): nothing can write.
                continue;
            };
            let Ok(rdev) = std::fs::metadata(&w.path).map(|m| m.rdev()) else {
                continue;
            };
            layers.push((w, sysfs, rdev));
        }
        layer_mounts.refresh(&layers.iter().map(|l| l.2).collect::<Vec<_>>());
        for (w, sysfs, rdev) in layers {
            let Some(bfree) = layer_mounts.free_blocks(rdev) else {
                // Mounted where no process's mount table shows it (or
                // unmounted since): nothing to read now.
                continue;
            };
            if let Some(prev) = cached(w.id, &sysfs, bfree) {
                v.push(prev);
                continue;
            }
            let Some((bsize, blocks)) = ext4_geometry(&w.path) else {
                continue;
            };
            let Ok(backed) = self.backend.allocated(w.dev) else {
                continue;
            };
            let Some((size, shares)) = shape(w.id) else {
                continue;
            };
            let delalloc = read_u64(&sysfs.join("delayed_allocation_blocks")).unwrap_or(0) * bsize;
            let one = journal_bytes(size) + META_MARGIN;
            v.push(Sample {
                id: w.id,
                bfree,
                // From the whole block count (statfs would take the
                // metadata overhead off): the guard uses differences only.
                used: blocks.saturating_sub(bfree) * bsize,
                bsize,
                delalloc,
                backed,
                hidden: if shares { 2 * one } else { one },
                errors: read_u64(&sysfs.join("errors_count")).unwrap_or(0),
                sysfs,
                layer: true,
            });
        }
        v
    }

    /// The pool's state as the guard sees it now (without its baselines:
    /// writeback in flight is not counted), with the overcommit.
    pub fn space_view(&self) -> Result<SpaceView> {
        let st = self.backend.status()?;
        let samples = self.space_samples(
            |id| self.space_shape(id),
            |_, _, _| None,
            &mut LayerMounts::default(),
        );
        let p = plan(st.total, st.available, &samples, |_| None, |_, _| true);
        let virtual_size: u64 = self
            .meta
            .list()?
            .iter()
            .filter(|r| r.kind == DeviceKind::Image)
            .map(|r| r.size.0)
            .sum();
        Ok(SpaceView {
            state: p.state,
            used_percent: (p.used_percent * 10.0).round() / 10.0,
            virtual_size,
            overcommit: if st.total == 0 {
                0.0
            } else {
                (virtual_size as f64 / st.total as f64 * 100.0).round() / 100.0
            },
            writable_mounted: samples.len(),
            writers_budget: p.budget.max(0) as u64,
        })
    }
}

/// The pool's space as `thinfs pool` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SpaceView {
    /// ok, low or full.
    pub state: PoolState,
    /// Percent of the pool in use.
    pub used_percent: f64,
    /// Sum of the images' virtual sizes (snapshots not counted).
    pub virtual_size: u64,
    /// `virtual_size` / pool size.
    pub overcommit: f64,
    /// Writable images mounted (guarded) now.
    pub writable_mounted: usize,
    /// Bytes the guard can still hand to writers.
    pub writers_budget: u64,
}

mod guard;

pub use guard::SpaceGuard;

/// Budget below which a fresh writable mount waits for the guard: more than
/// a page cache can take in the two ticks the wait saves.
const TIGHT_BUDGET: i64 = 8 * MARGIN as i64;
/// The longest a fresh writable mount waits for the guard's look.
const SEEN_WAIT: Duration = Duration::from_millis(500);

/// The guard's heartbeat. A writable filesystem mounted while the pool is
/// tight waits here until the guard has looked at it and set its reserve,
/// so that nothing is written into it unguarded; with room in the pool the
/// margin covers that first tick and nobody waits.
#[derive(Debug, Default)]
pub struct Pulse {
    ticks: parking_lot::Mutex<u64>,
    beat: parking_lot::Condvar,
    running: AtomicBool,
    tight: AtomicBool,
}

impl Pulse {
    /// The guard finished a tick; `tight` is whether its budget was low.
    fn tick_done(&self, tight: bool) {
        self.tight.store(tight, Ordering::Relaxed);
        *self.ticks.lock() += 1;
        self.beat.notify_all();
    }

    /// The guard started or stopped.
    fn set_running(&self, on: bool) {
        self.running.store(on, Ordering::Relaxed);
        let _g = self.ticks.lock();
        self.beat.notify_all();
    }

    /// Called once a writable mount is in the engine's tables: when the
    /// pool is tight, wait until a whole tick has run after this call (the
    /// one under way may have sampled before the mount was entered), at
    /// most [`SEEN_WAIT`]. Returns false if the guard did not come.
    pub(super) fn wait_seen(&self) -> bool {
        if !self.running.load(Ordering::Relaxed) || !self.tight.load(Ordering::Relaxed) {
            return true;
        }
        let deadline = std::time::Instant::now() + SEEN_WAIT;
        let mut n = self.ticks.lock();
        let target = *n + 2;
        while *n < target && self.running.load(Ordering::Relaxed) {
            if self.beat.wait_until(&mut n, deadline).timed_out() {
                return *n >= target;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: u32, used: u64, backed: u64, delalloc: u64) -> Sample {
        Sample {
            id: DeviceId::new(id).unwrap(),
            sysfs: PathBuf::new(),
            bsize: 4096,
            bfree: 1 << 20,
            used,
            delalloc,
            backed,
            hidden: 80 << 20,
            errors: 0,
            layer: false,
        }
    }

    #[test]
    fn mountinfo_lines_give_device_and_unescaped_mount_point() {
        let l = "36 35 253:7 / /run/x\\040y\\134z rw,noatime shared:1 - ext4 /dev/dm-7 rw";
        assert_eq!(
            mountinfo_line(l),
            Some((libc::makedev(253, 7), "/run/x y\\z".to_string()))
        );
        assert_eq!(mountinfo_line("garbage"), None);
    }

    #[test]
    fn layer_mounts_find_a_mount_by_device_and_forget_it() {
        // /proc is mounted in this process's namespace: found through
        // /proc/PID/root of a root process, read with statvfs, dropped
        // when not wanted. (Not as a user: root's tables are not theirs.)
        let dev = std::fs::metadata("/proc").unwrap().dev();
        let mut lm = LayerMounts::default();
        lm.refresh(&[dev]);
        assert_eq!(lm.free_blocks(dev).is_some(), euid_is_root(), "{lm:?}");
        lm.refresh(&[]);
        assert_eq!(lm.free_blocks(dev), None);
    }

    #[test]
    fn only_root_processes_mount_tables_are_read() {
        // pid 1 runs as root; this process does when the tests run as root.
        assert!(runs_as_root("1"));
        let me = std::process::id().to_string();
        assert_eq!(runs_as_root(&me), euid_is_root());
        assert!(!runs_as_root("not-a-pid"));
    }

    /// Whether this process runs as root, from /proc (no libc call).
    fn euid_is_root() -> bool {
        std::fs::metadata("/proc/self/status").is_ok_and(|m| m.uid() == 0)
    }

    #[test]
    fn journal_sizes_match_mke2fs() {
        assert_eq!(journal_bytes(10 << 30), 64 << 20);
        assert_eq!(journal_bytes(1 << 30), 32 << 20);
    }

    #[test]
    fn budget_counts_unbacked_data_and_hidden_metadata() {
        let s = [sample(1, 500 << 20, 300 << 20, 0), sample(2, 0, 0, 0)];
        let p = plan(2 << 30, 1 << 30, &s, |_| Some(0), |_, _| true);
        let want = (1i64 << 30) - MARGIN as i64 - (200 << 20) - 2 * (80 << 20);
        assert_eq!(p.budget, want);
        assert_eq!(p.allowed[0].1, want as u64 / 2);
        // Delayed allocations count even when backed space looks larger.
        let s = [sample(1, 0, 300 << 20, 50 << 20)];
        let p = plan(2 << 30, 1 << 30, &s, |_| Some(0), |_, _| false);
        assert_eq!(
            p.budget,
            (1 << 30) - MARGIN as i64 - (50 << 20) - (80 << 20)
        );
    }

    #[test]
    fn active_writers_get_more_and_full_gives_nothing() {
        let s = [sample(1, 0, 0, 0), sample(2, 0, 0, 0)];
        let p = plan(2 << 30, 1 << 30, &s, |_| Some(0), |id, _| id.get() == 1);
        assert_eq!(p.allowed[0].1, 4 * p.allowed[1].1);
        assert_eq!(p.state, PoolState::Ok);
        let p = plan(2 << 30, 200 << 20, &s, |_| Some(0), |_, _| true);
        assert_eq!(p.state, PoolState::Full);
        assert!(p.allowed.iter().all(|(_, a)| *a == 0));
    }
}
