//! `thinfs import NAME SOURCE [--size SIZE]`: SOURCE is a tarball (`-`:
//! stdin), opened by this process with the user's rights, or a directory,
//! which this process walks itself (the user's read rights apply) and
//! writes as a tar stream into a pipe. Either way the daemon gets one
//! descriptor and reads a tar stream. Progress on stderr when it is a
//! terminal; Ctrl-C ends this process, the daemon cancels and undoes.

use super::client;
use super::progress::bar;
use crate::daemon::proto::{Op, Progress};
use crate::error::{Error, Result};
use crate::service::{ImportRequest, Job};
use crate::sys::scm;
use crate::types::Bytes;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Bytes of image an entry needs besides its data: ext4's default ratio
/// of bytes per inode (mkfs gives an image one inode per 16 KiB), so that
/// an image sized to fit many small files does not run out of inodes.
const INODE_BYTES: u64 = 16 << 10;

/// Bytes a plain tarball's content needs on ext4, from its headers: each
/// entry's data in 4 KiB blocks plus [`INODE_BYTES`]; none when it does
/// not read as tar (the daemon says why).
fn tar_need(f: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let (mut off, mut total) = (0u64, 0u64);
    let mut h = [0u8; 512];
    loop {
        f.read_exact_at(&mut h, off).ok()?;
        if h.iter().all(|b| *b == 0) {
            return Some(total);
        }
        let size = tar::Header::from_byte_slice(&h).entry_size().ok()?;
        total = total.saturating_add(size.div_ceil(4096) * 4096 + INODE_BYTES);
        off = off.checked_add(512 + size.div_ceil(512) * 512)?;
    }
}

/// Bytes a directory's content takes on a filesystem (4 KiB blocks, and
/// [`INODE_BYTES`] per entry), counted as the user; unreadable parts
/// count 0 (the walk that follows reports them).
fn du(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.len().div_ceil(4096) * 4096 + INODE_BYTES;
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    total
}

/// A pipe: (read end, write end).
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = std::io::pipe().map_err(|e| Error::io("make a pipe", e))?;
    Ok((OwnedFd::from(r), OwnedFd::from(w)))
}

/// Run `thinfs import`.
pub fn import(
    socket: &Path,
    name: String,
    source: PathBuf,
    size: Option<String>,
    quiet: bool,
) -> Result<()> {
    let stdin = std::io::stdin();
    let job = Job::new();
    let is_dir = source != Path::new("-") && source.is_dir();
    let mut hint = None;
    let mut file = None;
    let mut pipe_r = None;
    let mut writer = None;
    if source == Path::new("-") {
        if scm::is_tty(stdin.as_fd()) {
            return Err(Error::Invalid(
                "refusing to read a tarball from a terminal: give a FILE, a directory, or a pipe"
                    .into(),
            ));
        }
    } else if is_dir {
        hint = Some(du(&source));
        let (r, w) = pipe()?;
        pipe_r = Some(r);
        let (dir, job2) = (source.clone(), job.clone());
        writer = Some(std::thread::spawn(move || {
            crate::service::tar_directory(&dir, std::fs::File::from(w), &job2)
        }));
    } else {
        let f = std::fs::File::open(&source)
            .map_err(|e| Error::io(format!("open {}", source.display()), e))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        // A plain tarball is sized from its headers (data and inodes);
        // failing that, about 4 times its length (small files: 1 KiB in
        // tar, a 4 KiB block and an inode here).
        // Compression is told by the first bytes, as the daemon does.
        let mut head = [0u8; 4];
        let got = std::os::unix::fs::FileExt::read_at(&f, &mut head, 0).unwrap_or(0);
        let head = &head[..got];
        let plain = !head.starts_with(&crate::service::GZIP_MAGIC)
            && !head.starts_with(&crate::service::ZSTD_MAGIC);
        if plain {
            hint = Some(tar_need(&f).unwrap_or(len.saturating_mul(4)));
        }
        file = Some(f);
    }
    let fd: BorrowedFd<'_> = match (&file, &pipe_r) {
        (Some(f), _) => f.as_fd(),
        (None, Some(r)) => r.as_fd(),
        (None, None) => stdin.as_fd(),
    };
    let pb = bar(quiet);
    let r = client::stream(
        socket,
        Op::Import(ImportRequest {
            name: name.clone(),
            size,
            content_hint: hint,
        }),
        &[fd],
        |p: Progress| super::progress::show(&pb, p),
    );
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    // The daemon has its own copy of the read end; ours goes, so that the
    // walk stops (EPIPE) if the daemon stopped reading.
    drop(pipe_r);
    drop(file);
    let walked = writer.map(|w| {
        w.join()
            .unwrap_or_else(|_| Err(Error::Invalid("the directory walk panicked".into())))
    });
    let v = match (r, walked) {
        // The walk's own error says more (e.g. a file it could not read).
        (Err(e), Some(Err(w))) if !matches!(w, Error::Cancelled(_)) => {
            return Err(Error::Invalid(format!(
                "reading {}: {w} (the import was undone: {e})",
                source.display()
            )));
        }
        (Err(e), _) => return Err(e),
        (Ok(_), Some(Err(w))) => return Err(w),
        (Ok(v), _) => v,
    };
    if !quiet {
        eprintln!(
            "imported {}: {} entries, {} of files, image of {}, snapshot {}",
            name,
            v["entries"].as_u64().unwrap_or(0),
            Bytes(v["file_bytes"].as_u64().unwrap_or(0)),
            Bytes(v["size"].as_u64().unwrap_or(0)),
            v["snapshot"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tarball_is_sized_from_its_headers() {
        let dir = std::env::temp_dir().join(format!("thinfs-tarneed-{}", std::process::id()));
        let mut b = tar::Builder::new(Vec::new());
        for (i, len) in [0usize, 1, 5000].iter().enumerate() {
            let mut h = tar::Header::new_gnu();
            h.set_size(*len as u64);
            h.set_cksum();
            b.append_data(&mut h, format!("f{i}"), &vec![7u8; *len][..])
                .unwrap();
        }
        std::fs::write(&dir, b.into_inner().unwrap()).unwrap();
        let f = std::fs::File::open(&dir).unwrap();
        let need = tar_need(&f);
        std::fs::write(&dir, b"not a tarball").unwrap();
        let junk = tar_need(&std::fs::File::open(&dir).unwrap());
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(need, Some(3 * INODE_BYTES + 4096 + 8192));
        assert_eq!(junk, None);
    }
}
