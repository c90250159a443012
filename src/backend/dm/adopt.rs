//! What a killed daemon left in device-mapper, at the next open: its dm
//! devices are torn down, except thin devices still mounted outside thinfs
//! (containerd mounts its snapshots' devices itself, and a running
//! container keeps its mount across a crash of the daemon). Those, and the
//! pool and loop devices under them, are used again as they are: the same
//! block device reaches the same live superblock, so a device never gets a
//! second filesystem instance. This module never removes a device that is
//! mounted, and never attaches a second loop device to a pool file.

use super::probe::dmerr;
use crate::error::{Error, Result};
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mount;
use devicemapper::{DM, DevId, DmFlags, DmNameBuf, DmOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a thin device of the dead daemon may stay open before it counts
/// as held by someone else. The dead daemon's own mounts (in its private
/// namespace) go away asynchronously after the kill.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Tear down the dm devices named `thinfs-<tag>-*` left by a killed daemon
/// (thin devices first, then the pool, then the linear devices), except
/// thin devices mounted outside thinfs. Returns the names of those kept;
/// when there are any, the pool and its linear devices are kept as well.
pub(super) fn leftovers(dm: &DM, tag: &str) -> Result<Vec<String>> {
    let prefix = format!("thinfs-{tag}-");
    let list = dm.list_devices().map_err(|e| dmerr("list dm devices", e))?;
    let mut ours: Vec<(String, u32)> = list
        .iter()
        .filter(|(n, ..)| n.to_string().starts_with(&prefix))
        .map(|(n, dev, _)| (n.to_string(), dev.minor))
        .collect();
    if ours.is_empty() {
        return Ok(Vec::new());
    }
    let rank = |n: &str| match n.strip_prefix(&prefix) {
        Some("pool") => 1,
        Some("meta") | Some("data") => 2,
        _ => 0,
    };
    ours.sort_by_key(|(n, _)| rank(n));
    let mut kept = Vec::new();
    for (n, minor) in ours {
        let name = DmNameBuf::new(n.clone()).map_err(|e| dmerr("dm name", e))?;
        let id = DevId::Name(&name);
        if rank(&n) > 0 && !kept.is_empty() {
            log::warn!(
                "recovery: keeping dm device {n}: {} thin device(s) on it are mounted outside thinfs",
                kept.len()
            );
            continue;
        }
        if rank(&n) == 0 {
            // Resume it (a crash may have left it suspended), then thaw a
            // filesystem a crash may have left frozen on it.
            let _ = dm.device_suspend(&id, DmOptions::default());
            crate::backend::thaw_leftover(&PathBuf::from(format!("/dev/dm-{minor}")));
        } else {
            log::warn!("recovery: removing dm device {n} left by an earlier daemon");
        }
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            match dm.device_remove(&id, DmOptions::default()) {
                Ok(_) => {
                    if rank(&n) == 0 {
                        log::warn!("recovery: removed dm device {n} left by an earlier daemon");
                    }
                    break;
                }
                Err(_) if rank(&n) == 0 && mounted_outside(minor) => {
                    log::warn!(
                        "recovery: thin device {n} (/dev/dm-{minor}) is mounted outside thinfs (containerd's); using it again"
                    );
                    kept.push(n.clone());
                    break;
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::Busy(format!("dm device {n} is still in use: {e}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok(kept)
}

/// Is `/dev/dm-MINOR` mounted in this process's mount table? The daemon's
/// own mounts live in a namespace that died with it; what is left here was
/// mounted by someone else.
fn mounted_outside(minor: u32) -> bool {
    let Ok(dm_major) = dm_major() else {
        return false;
    };
    let want = format!("{dm_major}:{minor}");
    mount::mount_table()
        .unwrap_or_default()
        .iter()
        .any(|m| m.dev == want)
}

/// device-mapper's block major, from `/proc/devices`.
fn dm_major() -> Result<u32> {
    let text =
        std::fs::read_to_string("/proc/devices").map_err(|e| Error::io("read /proc/devices", e))?;
    text.lines()
        .filter_map(|l| l.trim().split_once(' '))
        .find(|(_, name)| *name == "device-mapper")
        .and_then(|(n, _)| n.parse().ok())
        .ok_or_else(|| Error::Invalid("no device-mapper in /proc/devices".into()))
}

/// The loop device already attached to `file` (kept under a pool that is
/// used again), opened; `None` if there is none.
pub(super) fn existing_loop(file: &Path) -> Result<Option<LoopDevice>> {
    let want = file.to_string_lossy().into_owned();
    let found: Vec<_> = loopdev::attached()
        .into_iter()
        .filter(|l| l.backing_file == want)
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => LoopDevice::open_existing(&one.path)
            .map(Some)
            .map_err(|e| Error::io(format!("open {}", one.path.display()), e)),
        many => Err(Error::Busy(format!(
            "{want} is attached to {} loop devices: is another thinfs running on this state directory?",
            many.len()
        ))),
    }
}

/// Make an activated thin device read-only: the same table loaded again
/// with `DM_READONLY` (as `dmsetup --readonly`), then resumed. Writes to
/// the block device fail with EPERM and a read-write mount is refused.
pub(super) fn set_read_only(dm: &DM, name: &DmNameBuf) -> Result<()> {
    let id = DevId::Name(name);
    let table = dm
        .table_status(
            &id,
            DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
        )
        .map_err(|e| dmerr("read thin table", e))?
        .1;
    dm.table_load(
        &id,
        &table,
        DmOptions::default().set_flags(DmFlags::DM_READONLY),
    )
    .map_err(|e| dmerr("load read-only thin table", e))?;
    dm.device_suspend(&id, DmOptions::default())
        .map_err(|e| dmerr("resume read-only thin device", e))?;
    Ok(())
}
