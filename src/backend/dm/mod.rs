//! The dm-thin backend (Linux device-mapper, through the `devicemapper`
//! crate): O(1) snapshots, pool-level accounting, no fragmentation penalty.
//!
//! Layout in the state directory: `dm-meta.img` and `dm-data.img`, sparse
//! files attached to autoclear loop devices, under linear devices
//! `thinfs-<tag>-meta` / `-data`, under the pool `thinfs-<tag>-pool`
//! (data block size 64 KiB, metadata sized 48 bytes per data block, at
//! least 16 MiB; `error_if_no_space`, so writers get ENOSPC instead of
//! hanging). Thin device N is `thinfs-<tag>-N`, activated only while its
//! filesystem is mounted (read-only, `DM_READONLY`, for snapshots and
//! containerd's views).
//!
//! After a crash of the daemon, `adopt` tears down what it left, except a
//! thin device mounted outside thinfs (a running container's): that one,
//! with the pool and loop devices under it, is used again.
//!
//! dm-thin has no "list devices" message: every device the engine makes is
//! recorded (intent first) in sled, so recovery never needs to discover
//! unknown thin ids; `exists` probes by activating.
//!
//! Changed ranges (send, and "changed since the snapshot") come from the
//! pool's metadata (`delta`): a metadata snapshot read by `thin_delta`,
//! under one pool-wide lock, released at the end or, after a crash, at the
//! next open. Without `thin_delta` both devices are read whole.

mod adopt;
mod delta;
mod pool;
mod probe;

pub use pool::DmPool;
pub use probe::available;
