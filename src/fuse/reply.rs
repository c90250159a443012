//! How a request's outcome goes back to the kernel: the one mapping of
//! an error to an errno (with its log line), shared by every operation.

use crate::error::Error;
use fuser::Errno;

/// Map an error to an errno, logging one line. Ordinary outcomes of file
/// operations (ENOENT, EEXIST, EACCES...) are logged at debug level.
pub(super) fn errno(op: &str, ino: u64, e: &Error) -> Errno {
    let n = e.errno();
    let quiet = matches!(
        n,
        libc::ENOENT
            | libc::EEXIST
            | libc::EACCES
            | libc::ENOTEMPTY
            | libc::ENODATA
            | libc::ERANGE
            | libc::ENOTDIR
            | libc::EISDIR
            | libc::ELOOP
            | libc::ENOTSUP
            | libc::EROFS
    );
    if quiet {
        log::debug!("{op} (inode {ino:#x}): {e}");
    } else if let Some(dropped) = crate::lograte::FUSE.allow(crate::lograte::key_of(op)) {
        // Any user can make requests fail: at most a few lines a second
        // per request kind, with the error text cut.
        log::warn!(
            "{op} (inode {ino:#x}) failed, errno {n}: {}{}",
            crate::types::escape(&crate::types::cut(&e.to_string(), 300)),
            crate::lograte::dropped_note(dropped)
        );
    }
    Errno::from_i32(n)
}

pub(super) fn no(errno: i32, what: &str) -> Error {
    Error::io(what.to_string(), std::io::Error::from_raw_os_error(errno))
}

macro_rules! reply_or {
    ($reply:expr, $op:expr, $ino:expr, $res:expr, |$v:ident| $ok:expr) => {
        match $res {
            Ok($v) => $ok,
            Err(e) => $reply.error($crate::fuse::reply::errno($op, $ino, &e)),
        }
    };
}
pub(super) use reply_or;
