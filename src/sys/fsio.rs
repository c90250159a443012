//! File-system ioctls: FICLONE, FIFREEZE/FITHAW, syncfs, FITRIM, FIEMAP,
//! EXT4_IOC_RESIZE_FS, statvfs
//! (of a descriptor, or of a mount of a given block device).

use super::cvt;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

const FICLONE: libc::c_ulong = 0x4004_9409;
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
const FITRIM: libc::c_ulong = 0xC018_5879;
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// FIEMAP flag: allocated but reads as zeros.
pub const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

/// Make `dst` share all of `src`'s blocks (reflink).
pub fn ficlone(dst: impl AsFd, src: impl AsFd) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument.
    cvt(unsafe {
        libc::ioctl(
            dst.as_fd().as_raw_fd(),
            FICLONE,
            src.as_fd().as_raw_fd() as libc::c_long,
        )
    })?;
    Ok(())
}

/// FICLONERANGE: _IOW(0x94, 13, struct file_clone_range).
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// Make `len` bytes of `dst` at `off` share `src`'s blocks at the same
/// offset (reflink of a range; block-aligned, or reaching `src`'s end).
pub fn ficlone_range(dst: impl AsFd, src: impl AsFd, off: u64, len: u64) -> io::Result<()> {
    let arg = FileCloneRange {
        src_fd: src.as_fd().as_raw_fd() as i64,
        src_offset: off,
        src_length: len,
        dest_offset: off,
    };
    // SAFETY: FICLONERANGE reads a file_clone_range that lives on this
    // stack frame for the whole call.
    cvt(unsafe {
        libc::ioctl(
            dst.as_fd().as_raw_fd(),
            FICLONERANGE,
            &arg as *const FileCloneRange,
        )
    })?;
    Ok(())
}

/// Flush the whole filesystem that `fd` is on.
pub fn syncfs(fd: impl AsFd) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::syncfs(fd.as_fd().as_raw_fd()) })?;
    Ok(())
}

/// Freeze the filesystem that `fd` is on.
pub fn freeze(fd: impl AsFd) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE ignores its int argument; the pointer is valid.
    cvt(unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            FIFREEZE,
            &mut arg as *mut libc::c_int,
        )
    })?;
    Ok(())
}

/// Thaw the filesystem that `fd` is on.
pub fn thaw(fd: impl AsFd) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW ignores its int argument; the pointer is valid.
    cvt(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), FITHAW, &mut arg as *mut libc::c_int) })?;
    Ok(())
}

#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// Discard unused blocks of the filesystem `fd` is on; returns bytes trimmed.
pub fn fitrim(fd: impl AsFd) -> io::Result<u64> {
    let mut r = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: r is a valid fstrim_range the kernel reads and updates.
    cvt(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), FITRIM, &mut r as *mut FstrimRange) })?;
    Ok(r.len)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct FiemapHead {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

const BATCH: usize = 512;

#[repr(C)]
struct FiemapBuf {
    head: FiemapHead,
    ext: [FiemapExtent; BATCH],
}

/// Call `each` on every extent of a file, in file order (data flushed
/// first): the one FIEMAP loop, in batches of [`BATCH`] extents.
fn fiemap_walk(fd: impl AsFd, mut each: impl FnMut(&FiemapExtent)) -> io::Result<()> {
    let raw = fd.as_fd().as_raw_fd();
    let zero = FiemapExtent {
        fe_logical: 0,
        fe_physical: 0,
        fe_length: 0,
        fe_reserved64: [0; 2],
        fe_flags: 0,
        fe_reserved: [0; 3],
    };
    let mut buf = Box::new(FiemapBuf {
        head: FiemapHead {
            fm_start: 0,
            fm_length: 0,
            fm_flags: 0,
            fm_mapped_extents: 0,
            fm_extent_count: 0,
            fm_reserved: 0,
        },
        ext: [zero; BATCH],
    });
    let mut start = 0u64;
    loop {
        buf.head = FiemapHead {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: BATCH as u32,
            fm_reserved: 0,
        };
        // SAFETY: buf is a fiemap header followed by BATCH extents, as
        // fm_extent_count tells the kernel; it lives across the call.
        cvt(unsafe { libc::ioctl(raw, FS_IOC_FIEMAP, &mut *buf as *mut FiemapBuf) })?;
        let n = buf.head.fm_mapped_extents as usize;
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &buf.ext[..n.min(BATCH)] {
            each(e);
            start = e.fe_logical + e.fe_length;
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    Ok(())
}

/// Extent usage of a file: (bytes mapped, bytes mapped and not shared, extent count).
pub fn fiemap_usage(fd: impl AsFd) -> io::Result<(u64, u64, u64)> {
    let (mut total, mut exclusive, mut count) = (0u64, 0u64, 0u64);
    fiemap_walk(fd, |e| {
        total += e.fe_length;
        count += 1;
        if e.fe_flags & FIEMAP_EXTENT_SHARED == 0 {
            exclusive += e.fe_length;
        }
    })?;
    Ok((total, exclusive, count))
}

/// One extent of a file, as FIEMAP reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device below.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// Every extent of a file, in file order (data flushed first).
pub fn fiemap_extents(fd: impl AsFd) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    fiemap_walk(fd, |e| {
        out.push(Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            length: e.fe_length,
            flags: e.fe_flags,
        })
    })?;
    Ok(out)
}

/// statvfs of the filesystem `fd` is on: (block size, blocks, free, avail, files, ffree).
pub fn statvfs(fd: impl AsFd) -> io::Result<libc::statvfs> {
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: s is a valid statvfs the kernel fills in.
    cvt(unsafe { libc::fstatvfs(fd.as_fd().as_raw_fd(), &mut s) })?;
    Ok(s)
}

/// statvfs of the filesystem mounted at `path` if that filesystem lives on
/// block device `rdev` (ENODEV otherwise: the path is no longer a mount of
/// it). The path is opened `O_PATH` and closed at once: the mount is held
/// only for the three calls, as `df` holds it.
///
/// This is how the space guard reads a filesystem that containerd mounted
/// (in any mount namespace, through `/proc/PID/root`). It never asks the
/// kernel to find a superblock by device number, as ustat(2) does: in the
/// 6.1 kernel that lookup (`user_get_super`) rescans the superblock list
/// while a superblock of that device is being set up or torn down.
pub fn statvfs_at_dev(path: &std::path::Path, rdev: libc::dev_t) -> io::Result<libc::statvfs> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if f.metadata()?.dev() != rdev {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    statvfs(&f)
}

const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Grow a mounted ext4 filesystem (the one `fd` is on) to `blocks` blocks.
/// This is what resize2fs does online; it works on detached mounts, which
/// resize2fs cannot find.
pub fn ext4_resize(fd: impl AsFd, blocks: u64) -> io::Result<()> {
    // SAFETY: the kernel reads one u64 from the pointer given.
    cvt(unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            EXT4_IOC_RESIZE_FS,
            &blocks as *const u64,
        )
    })?;
    Ok(())
}
