//! The one error type of thinfs and its one errno mapping.
//!
//! Every layer returns [`Error`]; the FUSE layer turns it into an errno with
//! [`Error::errno`], the CLI into a message and an exit code. Source errors
//! (io) are kept inside, never flattened into a string.

use std::io;

/// Errors of every thinfs layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name (image, snapshot) is not acceptable.
    #[error("invalid name {name:?}: {why}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        why: &'static str,
    },
    /// A size string or value is not acceptable.
    #[error("invalid size {input:?}: {why}")]
    InvalidSize {
        /// The rejected input.
        input: String,
        /// Why it was rejected.
        why: &'static str,
    },
    /// A request that makes no sense in this place or state.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No such image, snapshot or device.
    #[error("not found: {0}")]
    NotFound(String),
    /// The name is taken.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The image still has content or snapshots.
    #[error("not empty: {0}")]
    NotEmpty(String),
    /// The device is in use (open files, mounted, newer snapshots).
    #[error("busy: {0}")]
    Busy(String),
    /// The caller lacks the right to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The pool is below its reserve, or out of ids.
    #[error("no space: {0}")]
    NoSpace(String),
    /// Write to a read-only snapshot.
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// Move across places where a rename cannot go.
    #[error("cross-device: {0}")]
    CrossDevice(String),
    /// The device is marked faulty and cannot be used.
    #[error("device {name} is faulty: {reason}")]
    Faulty {
        /// Device name.
        name: String,
        /// Recorded reason.
        reason: String,
    },
    /// A system call or external tool failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An external program (mkfs, e2fsck, resize2fs) ran and failed.
    #[error("{what}: {program} exited {status}: {stderr}")]
    Tool {
        /// What was being done.
        what: String,
        /// The program.
        program: &'static str,
        /// Its exit status, as the shell would say it.
        status: String,
        /// The last lines it printed on stderr.
        stderr: String,
    },
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Meta(#[from] sled::Error),
    /// A metadata record could not be decoded.
    #[error("corrupt metadata record: {0}")]
    Corrupt(String),
    /// The daemon refused or failed a request (CLI side).
    #[error("{message}")]
    Daemon {
        /// The daemon's message.
        message: String,
        /// The daemon's errno.
        errno: i32,
    },
    /// No daemon answers on the control socket.
    #[error(
        "thinfs is not running: no daemon answers on {socket} ({why}); start one with `thinfs mount`"
    )]
    NotRunning {
        /// Socket path tried.
        socket: String,
        /// The connect error.
        why: String,
    },
    /// A long operation was cancelled (its client went away or asked).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A snapshot stream, backup or archive is damaged or does not fit:
    /// the message says which record and why.
    #[error("bad stream: {0}")]
    BadStream(String),
    /// A failpoint fired (crash tests only).
    #[error("failpoint {0} fired")]
    Failpoint(String),
}

/// Result alias of thinfs.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap an io error with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The errno that a FUSE request failing with this error returns.
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidName { .. } | Error::InvalidSize { .. } | Error::Invalid(_) => {
                libc::EINVAL
            }
            Error::NotFound(_) => libc::ENOENT,
            Error::AlreadyExists(_) => libc::EEXIST,
            Error::NotEmpty(_) => libc::ENOTEMPTY,
            Error::Busy(_) => libc::EBUSY,
            Error::PermissionDenied(_) => libc::EPERM,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::ReadOnly(_) => libc::EROFS,
            Error::CrossDevice(_) => libc::EXDEV,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Daemon { errno, .. } => *errno,
            Error::NotRunning { .. } => libc::ENOTCONN,
            Error::Cancelled(_) => libc::ECANCELED,
            Error::BadStream(_) => libc::EBADMSG,
            Error::Tool { .. } => libc::EIO,
            Error::Faulty { .. } | Error::Meta(_) | Error::Corrupt(_) | Error::Failpoint(_) => {
                libc::EIO
            }
        }
    }
}

/// Attach a description to io results.
pub trait IoContext<T> {
    /// Turn an io error into [`Error::Io`] saying what was done.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
