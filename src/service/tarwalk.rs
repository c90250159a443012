//! A filesystem tree written as a tar stream (`thinfs export`): walks a
//! mounted inner filesystem from its root directory descriptor, never by
//! a path through the host. Every name is one component opened with
//! `openat(O_NOFOLLOW)` relative to its directory's descriptor, so no
//! symlink is ever followed.
//!
//! Entries: directories (before their content), regular files, symlinks,
//! hard links (the second and later names of an inode with several links
//! point at the first), fifos, character and block devices; numeric
//! owners, modes with the special bits, mtimes (PAX `mtime` with
//! nanoseconds), and every extended attribute as PAX
//! `SCHILY.xattr.NAME`, ACLs included (`system.posix_acl_access`,
//! `system.posix_acl_default`, in the kernel's binary form). Sockets have
//! no tar form and are skipped (counted). `lost+found` at the root is not
//! content and is left out.
//!
//! Output goes through [`JobWriter`]: it checks the job between writes
//! and never blocks for good on a pipe whose reader stopped reading, so a
//! cancel is noticed within a fraction of a second.

use super::Job;
use crate::error::{Error, Result};
use crate::sys::{file, scm};
use crate::types::{MAX_SHOWN, cut};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Counts of what went into the tarball.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Entries written.
    pub entries: u64,
    /// Bytes of file content written.
    pub file_bytes: u64,
    /// Sockets (no tar form) left out.
    pub skipped_sockets: u64,
}

/// The output: checks the job before each write, and waits for a pipe
/// in short polls so that a cancel is seen even when nobody reads.
pub struct JobWriter<'a> {
    out: File,
    /// The output is a pipe or fifo reopened non-blocking.
    nonblocking: bool,
    job: &'a Job,
    /// Bytes written (tar headers and padding included).
    pub written: u64,
    /// The walk failed: nothing more is written (no end marker).
    failed: bool,
}

impl<'a> JobWriter<'a> {
    /// Wrap `out`. A pipe or fifo is reopened as a new open file
    /// description with O_NONBLOCK (the sender's stays as it was).
    pub fn new(out: File, job: &'a Job) -> Result<JobWriter<'a>> {
        let st = file::fstat(out.as_fd()).map_err(|e| Error::io("stat the output", e))?;
        if !scm::is_writable(out.as_fd()).map_err(|e| Error::io("check the output", e))? {
            return Err(Error::Invalid(
                "the output descriptor is not open for writing".into(),
            ));
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFIFO {
            let nb = file::reopen(out.as_fd(), libc::O_WRONLY | libc::O_NONBLOCK)
                .map_err(|e| Error::io("reopen the output pipe", e))?;
            return Ok(JobWriter {
                out: nb,
                nonblocking: true,
                job,
                written: 0,
                failed: false,
            });
        }
        Ok(JobWriter {
            out,
            nonblocking: false,
            job,
            written: 0,
            failed: false,
        })
    }
}

impl Write for JobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::other("the tarball's walk failed"));
        }
        loop {
            if self.job.is_cancelled() {
                return Err(io::Error::other(CANCELLED));
            }
            match self.out.write(buf) {
                Ok(n) => {
                    self.written += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.nonblocking => {
                    scm::wait_writable(self.out.as_fd(), 200)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The message of the io error that carries a cancel through `tar`.
/// Deepest directory a walk goes into (each level holds two descriptors
/// and a stack frame while its content is written).
pub const MAX_DEPTH: usize = 1024;

/// Stack of the walk's thread: 32 KiB a level (a debug build takes about
/// 3), reserved, not used until touched.
const WALK_STACK: usize = (MAX_DEPTH + 32) * (32 << 10);

const CANCELLED: &str = "thinfs: job cancelled";

/// A file's content, counted into the job as it is read.
struct Counted<'a> {
    f: File,
    job: &'a Job,
    n: u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.f.read(buf)?;
        self.job.advance(n as u64);
        self.n += n as u64;
        Ok(n)
    }
}

/// Writes one tree into a tar builder.
pub struct Walker<'a, 'j> {
    tar: tar::Builder<&'a mut JobWriter<'j>>,
    job: &'j Job,
    /// First name of each inode with several links: (dev, ino) -> path.
    links: HashMap<(u64, u64), PathBuf>,
    /// What was written.
    pub counts: Counts,
    what: String,
}

impl<'a, 'j> Walker<'a, 'j> {
    /// A walker writing to `out`; `what` names the export in errors.
    pub fn new(out: &'a mut JobWriter<'j>, job: &'j Job, what: String) -> Walker<'a, 'j> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Complete);
        tar.follow_symlinks(false);
        Walker {
            tar,
            job,
            links: HashMap::new(),
            counts: Counts::default(),
            what,
        }
    }

    /// Map an io error of the walk, turning the writer's cancel back into
    /// [`Error::Cancelled`].
    fn err(&self, what: String, e: io::Error) -> Error {
        if self.job.is_cancelled() || e.to_string().contains(CANCELLED) {
            return Error::Cancelled(self.what.clone());
        }
        Error::io(what, e)
    }

    /// Write the whole tree under the root directory `root`, then the end
    /// of the archive.
    ///
    /// The walk recurses (a frame and two descriptors per level): it runs
    /// on a thread of its own whose stack holds [`MAX_DEPTH`] levels, and
    /// a deeper tree is refused.
    pub fn write_tree(mut self, root: BorrowedFd<'_>) -> Result<Counts> {
        let r = std::thread::scope(|s| {
            let w = &mut self;
            let t = std::thread::Builder::new()
                .name("tar-walk".into())
                .stack_size(WALK_STACK)
                .spawn_scoped(s, move || w.write_all(root));
            match t {
                Ok(t) => t.join().unwrap_or_else(|_| {
                    Err(Error::io(
                        "the directory walk",
                        io::Error::other("it panicked (a bug)"),
                    ))
                }),
                Err(e) => Err(Error::io("start the directory walk", e)),
            }
        });
        if r.is_err() {
            // The tar builder writes the end marker when it is dropped: a
            // failed walk must not look like a whole archive to its reader
            // (an import would take it, a pipe's reader too).
            self.tar.get_mut().failed = true;
        }
        r
    }

    fn write_all(&mut self, root: BorrowedFd<'_>) -> Result<Counts> {
        let dir = file::openat(
            root,
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| self.err("open the root directory".into(), e))?;
        self.dir_content(&dir, &PathBuf::new(), true)?;
        self.tar
            .finish()
            .map_err(|e| self.err("finish the tarball".into(), e))?;
        Ok(self.counts)
    }

    /// All names of directory `dir` (sorted, so that a tarball of the same
    /// tree is the same).
    fn names(&self, dir: &OwnedFd, path: &Path) -> Result<Vec<OsString>> {
        let f = file::reopen(dir.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| self.err(format!("open directory /{}", path.display()), e))?;
        let mut names = Vec::new();
        let mut off = 0;
        loop {
            let batch = file::read_dir_at(&f, off)
                .map_err(|e| self.err(format!("read directory /{}", path.display()), e))?;
            let Some(last) = batch.last() else { break };
            off = last.off;
            names.extend(
                batch
                    .into_iter()
                    .map(|e| e.name)
                    .filter(|n| n != "." && n != ".."),
            );
        }
        names.sort();
        Ok(names)
    }

    fn dir_content(&mut self, dir: &OwnedFd, path: &Path, is_root: bool) -> Result<()> {
        for name in self.names(dir, path)? {
            if is_root && name == "lost+found" {
                continue;
            }
            self.job.check(&self.what)?;
            self.entry(dir, path, &name)?;
        }
        Ok(())
    }

    /// One entry `name` of directory `dir` (at `path` in the archive).
    fn entry(&mut self, dir: &OwnedFd, path: &Path, name: &OsStr) -> Result<()> {
        let p = path.join(name);
        let shown = || format!("/{}", p.display());
        if p.as_os_str().len() > super::untar::MAX_PATH {
            return Err(Error::Invalid(format!(
                "a path of {} bytes (more than {}, which import takes) at {}; refused",
                p.as_os_str().len(),
                super::untar::MAX_PATH,
                cut(&shown(), MAX_SHOWN)
            )));
        }
        let h = file::open_path(dir.as_fd(), name).map_err(|e| self.err(shown(), e))?;
        let st = file::fstat(h.as_fd()).map_err(|e| self.err(shown(), e))?;
        let kind = st.st_mode & libc::S_IFMT;
        let mut hd = tar::Header::new_gnu();
        hd.set_mode(st.st_mode & 0o7777);
        hd.set_uid(u64::from(st.st_uid));
        hd.set_gid(u64::from(st.st_gid));
        hd.set_mtime(st.st_mtime.max(0) as u64);
        hd.set_size(0);
        let mut pax: Vec<(String, Vec<u8>)> = vec![(
            "mtime".into(),
            format!("{}.{:09}", st.st_mtime, st.st_mtime_nsec).into_bytes(),
        )];
        if kind != libc::S_IFLNK {
            self.xattrs(h.as_fd(), &mut pax)
                .map_err(|e| self.err(format!("extended attributes of {}", shown()), e))?;
        }
        // A second name of an inode already written: a hard link.
        if kind != libc::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key).cloned() {
                hd.set_entry_type(tar::EntryType::Link);
                return self.put_link(&mut hd, &p, &first, &[]);
            }
            self.links.insert(key, p.clone());
        }
        match kind {
            libc::S_IFDIR => {
                if p.components().count() > MAX_DEPTH {
                    return Err(Error::Invalid(format!(
                        "{} is deeper than {MAX_DEPTH} directories; refused",
                        cut(&shown(), MAX_SHOWN)
                    )));
                }
                hd.set_entry_type(tar::EntryType::Directory);
                self.put(&mut hd, &p, &pax, io::empty())?;
                let sub = file::openat(
                    dir.as_fd(),
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .map_err(|e| self.err(shown(), e))?;
                self.dir_content(&sub, &p, false)
            }
            libc::S_IFREG => {
                let f = file::openat(dir.as_fd(), name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                    .map_err(|e| self.err(shown(), e))?;
                let now = file::fstat(f.as_fd()).map_err(|e| self.err(shown(), e))?;
                if now.st_ino != st.st_ino {
                    return Err(Error::Busy(format!(
                        "{} changed during the export",
                        shown()
                    )));
                }
                hd.set_entry_type(tar::EntryType::Regular);
                hd.set_size(now.st_size as u64);
                let r = Counted {
                    f: File::from(f),
                    job: self.job,
                    n: 0,
                };
                // The walk reads a snapshot (read-only, unchanging), so
                // the size in the header is the size of the content.
                self.put(&mut hd, &p, &pax, r.take(now.st_size as u64))?;
                self.counts.file_bytes += now.st_size as u64;
                Ok(())
            }
            libc::S_IFLNK => {
                let target = file::readlink(h.as_fd()).map_err(|e| self.err(shown(), e))?;
                hd.set_entry_type(tar::EntryType::Symlink);
                self.put_link(
                    &mut hd,
                    &p,
                    &PathBuf::from(OsStr::from_bytes(&target)),
                    &pax,
                )
            }
            libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK => {
                hd.set_entry_type(match kind {
                    libc::S_IFIFO => tar::EntryType::Fifo,
                    libc::S_IFCHR => tar::EntryType::Char,
                    _ => tar::EntryType::Block,
                });
                if kind != libc::S_IFIFO {
                    let (ma, mi) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
                    hd.set_device_major(ma)
                        .and_then(|_| hd.set_device_minor(mi))
                        .map_err(|e| self.err(shown(), e))?;
                }
                self.put(&mut hd, &p, &pax, io::empty())
            }
            _ => {
                self.counts.skipped_sockets += 1;
                Ok(())
            }
        }
    }

    /// Every extended attribute of the inode behind `fd`, as PAX records.
    fn xattrs(&self, fd: BorrowedFd<'_>, pax: &mut Vec<(String, Vec<u8>)>) -> io::Result<()> {
        let len = file::listxattr(fd, 0)?.len();
        if len == 0 {
            return Ok(());
        }
        // Room for a list that grew in between.
        let list = file::listxattr(fd, len + 1024)?;
        for n in list.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let name = OsStr::from_bytes(n);
            let vlen = match file::getxattr(fd, name, 0) {
                Ok(v) => v.len(),
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
                Err(e) => return Err(e),
            };
            let value = file::getxattr(fd, name, vlen.max(1) + 1024)?;
            // GNU tar restores ACLs from their text form.
            let acl = match n {
                b"system.posix_acl_access" => Some("SCHILY.acl.access"),
                b"system.posix_acl_default" => Some("SCHILY.acl.default"),
                _ => None,
            };
            if let Some(key) = acl
                && let Some(text) = acl_text(&value)
            {
                pax.push((key.into(), text.into_bytes()));
            }
            pax.push((
                format!("SCHILY.xattr.{}", String::from_utf8_lossy(n)),
                value,
            ));
        }
        Ok(())
    }

    fn put(
        &mut self,
        hd: &mut tar::Header,
        p: &Path,
        pax: &[(String, Vec<u8>)],
        data: impl Read,
    ) -> Result<()> {
        self.pax(pax, p)?;
        let path = if hd.entry_type() == tar::EntryType::Directory {
            let mut s = p.as_os_str().to_os_string();
            s.push("/");
            PathBuf::from(s)
        } else {
            p.to_path_buf()
        };
        self.tar
            .append_data(hd, &path, data)
            .map_err(|e| self.err(format!("write /{} to the tarball", p.display()), e))?;
        self.counts.entries += 1;
        Ok(())
    }

    fn put_link(
        &mut self,
        hd: &mut tar::Header,
        p: &Path,
        target: &Path,
        pax: &[(String, Vec<u8>)],
    ) -> Result<()> {
        self.pax(pax, p)?;
        self.tar
            .append_link(hd, p, target)
            .map_err(|e| self.err(format!("write /{} to the tarball", p.display()), e))?;
        self.counts.entries += 1;
        Ok(())
    }

    fn pax(&mut self, pax: &[(String, Vec<u8>)], p: &Path) -> Result<()> {
        if pax.is_empty() {
            return Ok(());
        }
        self.tar
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(|e| self.err(format!("write /{} to the tarball", p.display()), e))
    }
}

/// An ACL in the kernel's xattr form (version 2: a u32 header, then
/// entries of u16 tag, u16 permissions, u32 id, little-endian) as the text
/// `acl_from_text` reads, with numeric ids: `user::rwx\nuser:1000:r-x...`.
fn acl_text(bin: &[u8]) -> Option<String> {
    if bin.len() < 4 || u32::from_le_bytes(bin[..4].try_into().ok()?) != 2 {
        return None;
    }
    let mut lines = Vec::new();
    for e in bin[4..].chunks(8) {
        if e.len() != 8 {
            return None;
        }
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let p = format!(
            "{}{}{}",
            if perm & 4 != 0 { 'r' } else { '-' },
            if perm & 2 != 0 { 'w' } else { '-' },
            if perm & 1 != 0 { 'x' } else { '-' }
        );
        lines.push(match tag {
            0x01 => format!("user::{p}"),
            0x02 => format!("user:{id}:{p}"),
            0x04 => format!("group::{p}"),
            0x08 => format!("group:{id}:{p}"),
            0x10 => format!("mask::{p}"),
            0x20 => format!("other::{p}"),
            _ => return None,
        });
    }
    Some(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_as_text() {
        let mut b = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 7u16, u32::MAX),
            (2, 5, 1000),
            (4, 4, u32::MAX),
            (0x10, 7, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            b.extend(tag.to_le_bytes());
            b.extend(perm.to_le_bytes());
            b.extend(id.to_le_bytes());
        }
        assert_eq!(
            acl_text(&b).unwrap(),
            "user::rwx\nuser:1000:r-x\ngroup::r--\nmask::rwx\nother::---"
        );
        assert!(acl_text(&b[..7]).is_none());
    }

    /// A tree `depth` directories deep (names `d`) under a new scratch
    /// directory, made through descriptors (no path is that long).
    fn deep_tree(depth: usize) -> std::path::PathBuf {
        let top = std::env::temp_dir().join(format!("thinfs-deep-{}-{depth}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        std::fs::create_dir_all(&top).unwrap();
        let mut d: OwnedFd = File::open(&top).unwrap().into();
        for _ in 0..depth {
            file::mkdirat(d.as_fd(), OsStr::new("d"), 0o755).unwrap();
            d = file::openat(
                d.as_fd(),
                OsStr::new("d"),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .unwrap();
        }
        top
    }

    fn remove_deep(top: &std::path::Path, depth: usize) {
        // Bottom up, through descriptors (remove_dir_all would recurse).
        let mut fds: Vec<OwnedFd> = vec![File::open(top).unwrap().into()];
        for _ in 0..depth {
            let last = fds.last().unwrap();
            let next = file::openat(
                last.as_fd(),
                OsStr::new("d"),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .unwrap();
            fds.push(next);
        }
        fds.pop();
        while let Some(parent) = fds.pop() {
            file::unlinkat(parent.as_fd(), OsStr::new("d"), true).unwrap();
        }
        std::fs::remove_dir(top).unwrap();
    }

    /// A directory tree any user can make in an image, as deep as they
    /// like: the walk (export, and the CLI's import of a directory) held
    /// two descriptors and a stack frame per level, and 5000 levels
    /// overflowed the stack (an abort of the daemon). Refused beyond
    /// MAX_DEPTH now, with the path; a tree at the bound is written.
    #[test]
    fn deep_trees_are_bounded() {
        for (depth, ok) in [(MAX_DEPTH, true), (5000, false)] {
            let top = deep_tree(depth);
            let job = Job::new();
            let out = File::create("/dev/null").unwrap();
            let r = super::super::import::tar_directory(&top, out, &job);
            remove_deep(&top, depth);
            match r {
                Ok(c) => assert!(ok, "{depth}: {c:?}"),
                Err(e) => {
                    assert!(!ok, "{depth}: {e}");
                    assert!(e.to_string().contains("deeper than"), "{e}");
                }
            }
        }
    }
}
