//! The embedded reflink backend.
//!
//! Layout in the state directory:
//! - `pool.img`: a sparse file formatted XFS with reflink, attached through
//!   an autoclear loop device and mounted *detached* (reachable only through
//!   the daemon's file descriptor). If the state directory itself is on a
//!   reflink-capable filesystem, `pool.img` is not made and `STATE/devices`
//!   is used directly.
//! - `devices/NNNNNNNN.img`: one sparse image file per thin device.
//!
//! Snapshot = FICLONE of the image file (the engine freezes the origin's
//! filesystem around it). Files get XFS extent-size hints so that random
//! writes do not fragment them into hundreds of thousands of extents, which
//! would make FICLONE slow.

mod pool;

pub use pool::ReflinkPool;
