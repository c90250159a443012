//! A tar stream unpacked into a filesystem reached only through its root
//! directory descriptor (`thinfs import`): never a host path, and no
//! symlink is ever followed. Every name is one component, created or
//! opened with `*at` calls relative to its directory's descriptor, each
//! directory opened `O_DIRECTORY|O_NOFOLLOW`.
//!
//! Refused (the whole import fails, nothing is left): an absolute path, a
//! `..` component, a path that goes through a symlink or a file of the
//! image (the classic "symlink to /tmp, then a file through it"), a hard
//! link to a name the archive did not make or to a directory. Symlink
//! targets are written as they are: they are never followed here.
//!
//! Kept: numeric owners, modes with the special bits (set after the owner,
//! which clears them), mtimes (PAX `mtime` with nanoseconds), extended
//! attributes (PAX `SCHILY.xattr.NAME`, ACLs included), symlinks, hard
//! links, fifos, character and block devices, sparse files (old GNU
//! `S` entries of up to 4 segments, PAX sparse 1.0) with their holes as
//! holes. A directory's mtime is set at the end, after its content was
//! made.

use super::Job;
use super::sparse;
use super::tario::*;
use crate::error::{Error, Result};
use crate::sys::file;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// Counts of what was unpacked.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Unpacked {
    /// Entries made.
    pub entries: u64,
    /// Bytes of file content written.
    pub file_bytes: u64,
}

/// Metadata of one entry, from its header and PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: libc::timespec,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Unpacks one archive under one root directory.
pub struct Unpacker<'a> {
    root: BorrowedFd<'a>,
    job: &'a Job,
    /// The last parent directory opened (components, descriptor).
    cached: Option<(Vec<OsString>, OwnedFd)>,
    /// Directories whose mtime is set at the end.
    dir_times: Vec<(Vec<OsString>, libc::timespec)>,
    counts: Unpacked,
    /// The copy buffer, reused from file to file.
    buf: Vec<u8>,
    /// Checks that the pool can take more (see [`Unpacker::space_check`]).
    space: Option<SpaceCheck<'a>>,
    /// Bytes written since the last space check.
    unchecked: u64,
}

/// A check that the pool has room for more of the import: an error
/// (typically [`Error::NoSpace`]) stops it.
pub type SpaceCheck<'a> = Box<dyn FnMut() -> Result<()> + 'a>;

/// Bytes written (file data, and 4 KiB per entry for its inode and name)
/// between two space checks.
pub const SPACE_CHECK_EVERY: u64 = 32 << 20;

/// Longest path or link target an entry may have (16 x PATH_MAX: tar can
/// store trees deeper than one path the kernel takes; a longer one would
/// cost a directory walk of that many components for each entry).
pub const MAX_PATH: usize = 64 << 10;

/// The error of entry `path`.
fn at(path: &Path, what: &str, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return Error::NoSpace(format!(
            "{what} /{}: the image is full (give a larger --size) or the pool is",
            path.display()
        ));
    }
    Error::io(format!("{what} /{}", path.display()), e)
}

/// The components of an archive path, or why it is refused.
fn components(p: &Path) -> Result<Vec<OsString>> {
    let mut v = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => v.push(s.to_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(Error::Invalid(format!(
                    "the archive has an absolute path ({}); refused, nothing was imported",
                    p.display()
                )));
            }
            Component::ParentDir => {
                return Err(Error::Invalid(format!(
                    "the archive has a path with `..` ({}); refused, nothing was imported",
                    p.display()
                )));
            }
        }
    }
    Ok(v)
}

fn join(c: &[OsString]) -> std::path::PathBuf {
    c.iter().collect()
}

impl<'a> Unpacker<'a> {
    /// An unpacker writing under `root`.
    pub fn new(root: BorrowedFd<'a>, job: &'a Job) -> Unpacker<'a> {
        Unpacker {
            root,
            job,
            cached: None,
            dir_times: Vec::new(),
            counts: Unpacked::default(),
            buf: Vec::new(),
            space: None,
            unchecked: 0,
        }
    }

    /// Run `check` every [`SPACE_CHECK_EVERY`] bytes written: the image's
    /// filesystem is not one the space guard watches (it is reachable by
    /// no path and has no record yet), so the import watches the pool
    /// itself.
    pub fn space_check(mut self, check: SpaceCheck<'a>) -> Unpacker<'a> {
        self.space = Some(check);
        self
    }

    /// Unpack every entry of the tar stream `input`.
    pub fn unpack(self, input: impl Read) -> Result<Unpacked> {
        let job = self.job;
        self.unpack_all(input).map_err(|e| {
            if job.is_cancelled() {
                Error::Cancelled("import".into())
            } else {
                e
            }
        })
    }

    fn unpack_all(mut self, input: impl Read) -> Result<Unpacked> {
        let mut ar = tar::Archive::new(EofSeen {
            inner: input,
            eof: false,
        });
        // Raw: long names and PAX records come as entries of their own and
        // are parsed here (the crate's PAX parser splits values at newlines,
        // which binary xattr values such as ACLs contain).
        let entries = ar
            .entries()
            .map_err(|e| bad_tar("read the archive", e))?
            .raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            self.job.check("import")?;
            let mut entry = entry.map_err(|e| bad_tar("read the archive", e))?;
            let t = entry.header().entry_type();
            if t.is_pax_local_extensions() {
                pending.pax = parse_pax(&read_small(&mut entry)?)?;
            } else if t.is_pax_global_extensions() {
                read_small(&mut entry)?;
            } else if t.is_gnu_longname() {
                pending.name = Some(trim_nul(read_small(&mut entry)?));
            } else if t.is_gnu_longlink() {
                pending.link = Some(trim_nul(read_small(&mut entry)?));
            } else {
                self.spend(4096)?;
                self.entry(&mut entry, std::mem::take(&mut pending))?;
                self.counts.entries += 1;
            }
        }
        // The tar crate takes an end of input between two entries for the
        // end of the archive: only the end marker (zero blocks) is.
        let mut rest = ar.into_inner();
        if rest.eof {
            return Err(Error::BadStream(
                "the archive ends without its end marker (truncated, or its writer failed); nothing was imported"
                    .into(),
            ));
        }
        // What follows the end marker (tar's padding) is read to the end
        // of the input: a compressed stream's end, and its checksum, are
        // checked there.
        io::copy(&mut rest, &mut io::sink())
            .map_err(|e| bad_tar("read the input after the archive's end", e))?;
        for (c, t) in std::mem::take(&mut self.dir_times).into_iter().rev() {
            let h = self.open_handle(&c)?;
            file::utimens(h.as_fd(), &[t, t]).map_err(|e| at(&join(&c), "set times of", e))?;
        }
        Ok(self.counts)
    }

    fn meta<R: Read>(&self, entry: &tar::Entry<'_, R>, p: &Pending) -> Result<Meta> {
        let h = entry.header();
        let num = |r: io::Result<u64>, what: &str| -> Result<u32> {
            r.ok()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| Error::BadStream(format!("bad {what} in a tar header")))
        };
        let mut m = Meta {
            mode: num(h.mode().map(u64::from), "mode")? & 0o7777,
            uid: num(h.uid(), "uid")?,
            gid: num(h.gid(), "gid")?,
            mtime: libc::timespec {
                tv_sec: h.mtime().unwrap_or(0) as i64,
                tv_nsec: 0,
            },
            xattrs: Vec::new(),
        };
        for (key, value) in &p.pax {
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                m.xattrs
                    .push((OsStr::from_bytes(name).to_owned(), value.clone()));
            } else if key == b"mtime" {
                if let Some(t) = parse_time(value) {
                    m.mtime = t;
                }
            } else if key == b"uid" {
                m.uid = pax_num(value, "uid")?;
            } else if key == b"gid" {
                m.gid = pax_num(value, "gid")?;
            } else if key == b"size"
                && std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    != h.size().ok()
            {
                // The tar crate's raw reader takes the header's size: one
                // the header cannot hold (8 GiB and more) is not read.
                return Err(Error::BadStream(
                    "a file size in a PAX record that differs from its header's (a file of 8 GiB or more in PAX form) is not supported; nothing was imported"
                        .into(),
                ));
            }
        }
        Ok(m)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, p: Pending) -> Result<()> {
        let raw_path = p
            .pax_value(b"GNU.sparse.name")
            .or_else(|| p.pax_value(b"path"))
            .or(p.name.clone())
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        if raw_path.len() > MAX_PATH {
            return Err(Error::BadStream(format!(
                "an entry's path of {} bytes (more than {MAX_PATH}); refused, nothing was imported",
                raw_path.len()
            )));
        }
        let path = Path::new(OsStr::from_bytes(&raw_path)).to_path_buf();
        let comps = components(&path)?;
        let meta = self.meta(entry, &p)?;
        let link = p
            .pax_value(b"linkpath")
            .or(p.link.clone())
            .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
        if link.as_ref().is_some_and(|l| l.len() > MAX_PATH) {
            return Err(Error::BadStream(format!(
                "link /{} has a target of more than {MAX_PATH} bytes; refused, nothing was imported",
                path.display()
            )));
        }
        let kind = entry.header().entry_type();
        let Some((name, parent)) = comps.split_last() else {
            // The archive's root (`./`): its metadata goes to the image's root.
            if kind.is_dir() {
                self.apply(&comps, &path, &meta, false)?;
                self.dir_times.push((comps, meta.mtime));
            }
            return Ok(());
        };
        let dir = self.parent(parent, &path)?;
        let d = dir.as_fd();
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                match file::mkdirat(d, name, 0o700) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        let st = file::stat_at(d, name).map_err(|e| at(&path, "stat", e))?;
                        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                            self.replace(d, name, &path)?;
                            file::mkdirat(d, name, 0o700).map_err(|e| at(&path, "mkdir", e))?;
                        }
                    }
                    Err(e) => return Err(at(&path, "mkdir", e)),
                }
                drop(dir);
                self.apply(&comps, &path, &meta, false)?;
                self.dir_times.push((comps, meta.mtime));
                return Ok(());
            }
            T::GNUSparse | T::Regular | T::Continuous => {
                let map = sparse::entry_map(entry, &p, &raw_path)?;
                let f = self.make(d, name, &path, |d, n| {
                    file::openat(
                        d,
                        n,
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                        0o600,
                    )
                    .map(File::from)
                })?;
                let mut buf = std::mem::take(&mut self.buf);
                let n = sparse::write_data(entry, &f, &map, &path, &mut buf, |n| self.spend(n), at);
                self.buf = buf;
                let n = n?;
                self.counts.file_bytes += n;
            }
            T::Symlink => {
                let target = link.ok_or_else(|| {
                    Error::BadStream(format!("symlink /{} has no target", path.display()))
                })?;
                self.make(d, name, &path, |d, n| {
                    file::symlinkat(OsStr::from_bytes(&target), d, n)
                })?;
            }
            T::Link => {
                let target = link.ok_or_else(|| {
                    Error::BadStream(format!("hard link /{} has no target", path.display()))
                })?;
                let target = Path::new(OsStr::from_bytes(&target)).to_path_buf();
                let tc = components(&target)?;
                let h = self.open_handle(&tc).map_err(|e| {
                    Error::Invalid(format!(
                        "hard link /{} to /{}, which the archive did not make before: {e}",
                        path.display(),
                        target.display()
                    ))
                })?;
                let st = file::fstat(h.as_fd()).map_err(|e| at(&target, "stat", e))?;
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    return Err(Error::Invalid(format!(
                        "hard link /{} to the directory /{}; refused",
                        path.display(),
                        target.display()
                    )));
                }
                self.make(d, name, &path, |d, n| file::linkat(h.as_fd(), d, n))?;
                // A link shares the first name's inode and metadata.
                return Ok(());
            }
            T::Char | T::Block | T::Fifo => {
                let fmt = match kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let rdev = libc::makedev(major, minor);
                self.make(d, name, &path, |d, n| {
                    file::mknodat(d, n, fmt | 0o600, rdev)
                })?;
            }
            T::XGlobalHeader => return Ok(()),
            other => {
                return Err(Error::BadStream(format!(
                    "entry /{} has a tar type this import does not know ({other:?}); refused",
                    path.display()
                )));
            }
        }
        drop(dir);
        self.apply(&comps, &path, &meta, kind.is_symlink())
    }

    /// Count `n` bytes about to be written into the image; every
    /// [`SPACE_CHECK_EVERY`] bytes the space check runs.
    fn spend(&mut self, n: u64) -> Result<()> {
        self.unchecked += n;
        if self.unchecked >= SPACE_CHECK_EVERY {
            self.unchecked = 0;
            if let Some(check) = &mut self.space {
                check()?;
            }
        }
        Ok(())
    }

    /// Make `name` in `d` with `mk`; a non-directory already there is
    /// replaced (a later entry of an archive wins, as with tar).
    fn make<T>(
        &self,
        d: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        mk: impl Fn(BorrowedFd<'_>, &OsStr) -> io::Result<T>,
    ) -> Result<T> {
        match mk(d, name) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.replace(d, name, path)?;
                mk(d, name).map_err(|e| at(path, "create", e))
            }
            r => r.map_err(|e| at(path, "create", e)),
        }
    }

    /// Remove what is at `name` (an empty directory or a non-directory).
    fn replace(&self, d: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<()> {
        let st = file::stat_at(d, name).map_err(|e| at(path, "stat", e))?;
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        file::unlinkat(d, name, is_dir).map_err(|e| at(path, "replace", e))
    }

    /// Owner, mode, xattrs and (not for directories) times of `comps`.
    fn apply(&self, comps: &[OsString], path: &Path, m: &Meta, symlink: bool) -> Result<()> {
        let h = self.open_handle(comps)?;
        file::chown(h.as_fd(), m.uid, m.gid).map_err(|e| at(path, "chown", e))?;
        if symlink {
            return file::utimens(h.as_fd(), &[m.mtime, m.mtime])
                .map_err(|e| at(path, "set times of", e));
        }
        // ACLs inherited from a default ACL of the directory are not the
        // archive's: only the archive's stay.
        for acl in ["system.posix_acl_access", "system.posix_acl_default"] {
            if m.xattrs.iter().any(|(k, _)| k == acl) {
                continue;
            }
            match file::removexattr(h.as_fd(), OsStr::new(acl)) {
                Err(e)
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) | Some(libc::EACCES)
                    ) =>
                {
                    return Err(at(path, "remove an inherited ACL of", e));
                }
                _ => {}
            }
        }
        file::chmod(h.as_fd(), m.mode).map_err(|e| at(path, "chmod", e))?;
        for (k, v) in &m.xattrs {
            file::setxattr(h.as_fd(), k, v, 0).map_err(|e| {
                at(
                    path,
                    &format!("set extended attribute {} of", k.to_string_lossy()),
                    e,
                )
            })?;
        }
        let st = file::fstat(h.as_fd()).map_err(|e| at(path, "stat", e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            file::utimens(h.as_fd(), &[m.mtime, m.mtime])
                .map_err(|e| at(path, "set times of", e))?;
        }
        Ok(())
    }

    /// An O_PATH handle of `comps` (the root for none), never through a
    /// symlink.
    fn open_handle(&self, comps: &[OsString]) -> Result<OwnedFd> {
        let Some((last, parent)) = comps.split_last() else {
            return file::openat(
                self.root,
                OsStr::new("."),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )
            .map_err(|e| Error::io("open the image's root", e));
        };
        let mut dir = file::openat(
            self.root,
            OsStr::new("."),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| Error::io("open the image's root", e))?;
        for c in parent {
            dir = file::openat(
                dir.as_fd(),
                c,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| through(&join(comps), c, e))?;
        }
        file::open_path(dir.as_fd(), last).map_err(|e| at(&join(comps), "open", e))
    }

    /// The directory `parent` (made if missing), never through a symlink.
    fn parent(&mut self, parent: &[OsString], path: &Path) -> Result<OwnedFd> {
        if let Some((c, fd)) = &self.cached
            && c.as_slice() == parent
        {
            return fd
                .try_clone()
                .map_err(|e| Error::io("duplicate a descriptor", e));
        }
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let mut dir = file::openat(
            self.root,
            OsStr::new("."),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| Error::io("open the image's root", e))?;
        for c in parent {
            let next = match file::openat(dir.as_fd(), c, flags, 0) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    match file::mkdirat(dir.as_fd(), c, 0o755) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(at(path, "make a directory above", e)),
                    }
                    file::openat(dir.as_fd(), c, flags, 0)
                }
                r => r,
            };
            dir = next.map_err(|e| through(path, c, e))?;
        }
        let d = dir
            .try_clone()
            .map_err(|e| Error::io("duplicate a descriptor", e))?;
        self.cached = Some((parent.to_vec(), d));
        Ok(dir)
    }
}

/// A path component that is not a directory of the image.
fn through(path: &Path, c: &OsStr, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => Error::Invalid(format!(
            "the archive's path /{} goes through {}, which is a symlink or not a directory in the image; refused, nothing was imported",
            path.display(),
            c.to_string_lossy()
        )),
        _ => at(path, "open a directory above", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_times() {
        assert!(components(Path::new("/etc/passwd")).is_err());
        assert!(components(Path::new("a/../../b")).is_err());
        assert_eq!(components(Path::new("./a/b")).unwrap().len(), 2);
        let t = parse_time(b"12.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (12, 500_000_000));
        let t = parse_time(b"7").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (7, 0));
        let p = parse_pax(b"21 SCHILY.xattr.a=\n\n\n11 path=ab\n").unwrap();
        assert_eq!(p[0], (b"SCHILY.xattr.a".to_vec(), b"\n\n".to_vec()));
        assert_eq!(p[1], (b"path".to_vec(), b"ab".to_vec()));
        assert!(parse_pax(b"99 path=x\n").is_err());
    }
}
