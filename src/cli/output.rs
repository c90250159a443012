//! Output files of the CLI (`export -o`, `backup -o`): opened so that no
//! other user can redirect them. The last component is never followed if
//! it is a symbolic link (`O_NOFOLLOW`; a new file is made with
//! `O_CREAT|O_EXCL`, which never follows one either), and an existing file
//! is replaced only with `--force`, and then only a regular file with one
//! link (a hard link planted in a shared directory would be another
//! user's file). An existing pipe or character device (`/dev/null`) is
//! written to as it is: nothing is replaced. A file this command made is removed again when the
//! command fails, if it is still the one at the path.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// An output file, opened.
pub struct Output {
    /// The open file.
    pub file: File,
    path: PathBuf,
    created: bool,
}

impl Output {
    /// Create `path` with `mode` (before the umask), or with `force`
    /// truncate the regular file already there.
    pub fn open(path: &Path, mode: u32, force: bool) -> Result<Output> {
        let shown = path.display();
        let fresh = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path);
        match fresh {
            Ok(file) => {
                return Ok(Output {
                    file,
                    path: path.to_path_buf(),
                    created: true,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("create {shown}"), e)),
        }
        let replaces = |m: &std::fs::Metadata| {
            let t = m.file_type();
            !(t.is_fifo() || t.is_char_device())
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::AlreadyExists(format!(
                    "{shown} is a symbolic link: refusing to write through it (remove it, \
                     or give another path)"
                )));
            }
            Ok(m) if replaces(&m) && !force => {
                return Err(Error::AlreadyExists(format!(
                    "{shown} exists: refusing to overwrite it (--force replaces a regular file)"
                )));
            }
            _ => {}
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => Error::AlreadyExists(format!(
                    "{shown} is a symbolic link: refusing to write through it"
                )),
                _ => Error::io(format!("open {shown}"), e),
            })?;
        let m = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {shown}"), e))?;
        if !replaces(&m) {
            // A pipe or a character device (/dev/null): written, not replaced.
            return Ok(Output {
                file,
                path: path.to_path_buf(),
                created: false,
            });
        }
        if !force {
            return Err(Error::AlreadyExists(format!(
                "{shown} exists: refusing to overwrite it (--force replaces a regular file)"
            )));
        }
        if !m.file_type().is_file() {
            return Err(Error::Invalid(format!(
                "{shown} is not a regular file, a pipe or a character device"
            )));
        }
        if m.nlink() > 1 {
            return Err(Error::Invalid(format!(
                "{shown} has {} links: refusing to overwrite a file that has other names",
                m.nlink()
            )));
        }
        file.set_len(0)
            .map_err(|e| Error::io(format!("truncate {shown}"), e))?;
        Ok(Output {
            file,
            path: path.to_path_buf(),
            created: false,
        })
    }

    /// The command failed: remove the file if this command made it and it
    /// is still the one at the path (a partial output is worth nothing).
    pub fn discard(self) {
        if !self.created {
            return;
        }
        let (Ok(ours), Ok(there)) = (self.file.metadata(), std::fs::symlink_metadata(&self.path))
        else {
            return;
        };
        if ours.dev() == there.dev() && ours.ino() == there.ino() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("thinfs-output-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn symlinks_are_never_followed() {
        let d = scratch("link");
        let target = d.join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = d.join("out");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for force in [false, true] {
            let e = Output::open(&link, 0o600, force).err().unwrap();
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        // A dangling link too (O_CREAT would create its target).
        let dangling = d.join("dangling");
        std::os::unix::fs::symlink(d.join("nowhere"), &dangling).unwrap();
        assert!(Output::open(&dangling, 0o600, true).is_err());
        assert!(!d.join("nowhere").exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn existing_files_need_force_and_one_link() {
        let d = scratch("exist");
        let p = d.join("out");
        std::fs::write(&p, b"old").unwrap();
        let e = Output::open(&p, 0o600, false).err().unwrap();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(e.errno(), libc::EEXIST);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let o = Output::open(&p, 0o600, true).unwrap();
        assert_eq!(o.file.metadata().unwrap().len(), 0);
        // An overwritten file is not ours to remove.
        o.discard();
        assert!(p.exists());
        let other = d.join("other-name");
        std::fs::hard_link(&p, &other).unwrap();
        assert!(Output::open(&p, 0o600, true).is_err());
        // A pipe is written to, without --force, and never removed.
        let fifo = d.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        Output::open(&fifo, 0o600, false).unwrap().discard();
        assert!(fifo.exists());
        drop(reader);
        // A new file is removed when the command fails.
        let n = d.join("new");
        Output::open(&n, 0o600, false).unwrap().discard();
        assert!(!n.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
