//! File attributes: from `stat` for real files, made up for virtual ones.

use fuser::{FileAttr, FileType, INodeNo};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        // Before 1970: `sec` is rounded down, `nsec` counts up from it.
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
            + Duration::from_nanos(nsec.clamp(0, 999_999_999) as u64)
    }
}

/// FUSE file type of `S_IFMT` bits.
pub fn kind_of(fmt: u32) -> FileType {
    match fmt {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// FUSE file type of a `DT_*` value.
pub fn kind_of_dt(dt: u8) -> FileType {
    match dt {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// Attributes of a real file, under our inode number.
pub fn from_stat(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode & libc::S_IFMT),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// Attributes of a virtual directory or file (root-owned, read-only for others).
pub fn virtual_attr(ino: u64, dir: bool, size: u64, since: SystemTime) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: since,
        mtime: since,
        ctime: since,
        crtime: since,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o444 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The group of the mount root: the highest valid group id (-1 is the
/// kernel's invalid id, which would make it refuse writes to the root,
/// `HAS_UNMAPPED_ID()`). No account has it; a process can only get it
/// from root's `setgroups` or a user namespace mapping it.
pub const ROOT_GID: u32 = u32::MAX - 1;

/// Give the mount root the rights 0755 gives, without group bits: the
/// kernel's permission check asks for a directory's ACL only when its
/// mode has group bits (`acl_permission_check()` calls `check_acl()` only
/// then), and it never caches the root's ACL: the root inode is made while
/// mounting, before the INIT reply turns POSIX ACLs on, so
/// `fuse_init_inode()` marks it `ACL_DONT_CACHE`, and no later
/// invalidation clears that (measured on 6.18). With 0755, every path
/// walk through the mount by anyone but root cost one GETXATTR round trip
/// and left RCU walk mode. Nobody's access changes: 0755 gave the group
/// what it gives others, and nobody is in [`ROOT_GID`].
pub fn no_group_class(a: &mut FileAttr) {
    a.gid = ROOT_GID;
    a.perm = 0o705;
}

/// How long the kernel may cache attributes `a`: `ttl`, except for a
/// regular file with setuid or setgid, which gets none. A write, truncate
/// or chown clears those bits on disk (ext4 does it as the writer), and
/// the kernel learns nothing of it: a passthrough write never reaches the
/// daemon, and after a write the kernel marks only size and times stale,
/// so a `stat` asking for the mode alone (`stat -c %a`, `ls`) would show
/// the bits for the whole TTL. With no caching, every such question
/// reaches the inner file. Such files are few, and a `stat` of one costs a
/// round trip.
pub fn ttl_for(a: &FileAttr, ttl: Duration) -> Duration {
    if a.kind == FileType::RegularFile && a.perm & 0o6000 != 0 {
        Duration::ZERO
    } else {
        ttl
    }
}
