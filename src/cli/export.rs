//! `thinfs export NAME[@SNAP] [-o FILE]`: the CLI opens the output itself
//! (so the user's own rights apply to it), passes the descriptor to the
//! daemon, and shows progress on stderr when stderr is a terminal. A
//! tarball is never written to a terminal; a file is opened as
//! [`Output`] says (never through a symbolic link, an existing one only
//! with `--force`). Ctrl-C ends this process,
//! which closes the connection: the daemon cancels and undoes.
//!
//! zstd (`-o FILE.tar.zst`, or `--zstd` for any output) is done here, in
//! the caller's process: the daemon writes the plain tarball into a pipe
//! and a thread of this process compresses it into the output, so the
//! daemon spends no CPU on it and its protocol is unchanged.

use super::client;
use super::output::Output;
use super::progress::bar;
use crate::daemon::proto::{Op, Progress};
use crate::error::{Error, Result};
use crate::service::ExportRequest;
use crate::sys::scm;
use crate::types::Bytes;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// zstd level of an export: zstd's default, a good ratio at well over
/// 100 MB/s on one core.
const ZSTD_LEVEL: i32 = 3;

/// Refuse outputs that cannot be right: a terminal. Returns whether the
/// tarball is compressed with zstd (`--zstd`, or a name ending in `.zst`).
fn check_output(out: Option<&Path>, stdout_is_tty: bool, zstd: bool) -> Result<bool> {
    match out {
        None if stdout_is_tty => Err(Error::Invalid(
            "refusing to write a tarball to a terminal: use -o FILE or a pipe".into(),
        )),
        Some(p) => Ok(zstd || p.extension().is_some_and(|e| e == "zst" || e == "zstd")),
        None => Ok(zstd),
    }
}

/// Compress what comes from `from` (the daemon's pipe) into `to` until the
/// daemon closes its end; returns the compressed length. On an error the
/// read end is dropped, so the daemon's writes fail and the export stops.
fn compress(from: OwnedFd, to: OwnedFd) -> Result<u64> {
    struct Counting<W> {
        w: W,
        n: u64,
    }
    impl<W: Write> Write for Counting<W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.w.write(b)?;
            self.n += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.w.flush()
        }
    }
    let out = Counting {
        w: std::fs::File::from(to),
        n: 0,
    };
    let err = |e| Error::io("compress the tarball (zstd) into the output", e);
    let mut enc = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL).map_err(err)?;
    // A checksum of the content, as zstd(1) writes by default: without it
    // damaged stored blocks decode to wrong bytes unnoticed.
    enc.include_checksum(true).map_err(err)?;
    std::io::copy(&mut std::fs::File::from(from), &mut enc).map_err(err)?;
    let mut out = enc.finish().map_err(err)?;
    out.flush().map_err(err)?;
    Ok(out.n)
}

/// Run `thinfs export`.
pub fn export(
    socket: &Path,
    target: String,
    out: Option<PathBuf>,
    force: bool,
    zstd: bool,
    quiet: bool,
) -> Result<()> {
    let out = out.filter(|p| p != Path::new("-"));
    let zstd = check_output(out.as_deref(), scm::is_tty(std::io::stdout()), zstd)?;
    let file = match &out {
        None => None,
        Some(p) => Some(Output::open(p, 0o666, force)?),
    };
    let stdout = std::io::stdout();
    let fd = match &file {
        Some(f) => f.file.as_fd(),
        None => stdout.as_fd(),
    };
    // With zstd the daemon gets a pipe's write end instead.
    let mut pipe_w = None;
    let mut compressor = None;
    if zstd {
        let (r, w) = std::io::pipe().map_err(|e| Error::io("make a pipe", e))?;
        let to = fd
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicate the output", e))?;
        let r = OwnedFd::from(r);
        compressor = Some(std::thread::spawn(move || compress(r, to)));
        pipe_w = Some(OwnedFd::from(w));
    }
    let fd = pipe_w.as_ref().map_or(fd, |w| w.as_fd());
    let pb = bar(quiet);
    let r = client::stream(
        socket,
        Op::Export(ExportRequest {
            target: target.clone(),
        }),
        &[fd],
        |p: Progress| super::progress::show(&pb, p),
    );
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    // The daemon has closed its copy: the compressor sees the end.
    drop(pipe_w);
    let compressed = compressor.map(|t| {
        t.join()
            .unwrap_or_else(|_| Err(Error::Invalid("the zstd compressor panicked".into())))
    });
    let r = match (r, compressed) {
        // The compressor's own error says more (e.g. the disk is full).
        (Err(e), Some(Err(c))) => Err(Error::Invalid(format!("{c} (the export stopped: {e})"))),
        (Ok(_), Some(Err(c))) => Err(c),
        (r, c) => r.map(|v| (v, c.and_then(Result::ok))),
    };
    match r {
        Ok((v, compressed)) => {
            if !quiet {
                let zst = compressed
                    .map(|n| format!(", {} with zstd", Bytes(n)))
                    .unwrap_or_default();
                eprintln!(
                    "exported {target}: {} entries, {} of files, {} tarball{zst}",
                    v["entries"].as_u64().unwrap_or(0),
                    Bytes(v["file_bytes"].as_u64().unwrap_or(0)),
                    Bytes(v["bytes"].as_u64().unwrap_or(0)),
                );
            }
            Ok(())
        }
        Err(e) => {
            // A tarball cut short is worth nothing: remove a file this
            // command made.
            if let Some(f) = file {
                f.discard();
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_is_refused_and_zst_names_compress() {
        let e = check_output(None, true, false).unwrap_err().to_string();
        assert!(e.contains("terminal"), "{e}");
        assert!(check_output(None, true, true).is_err());
        assert!(!check_output(None, false, false).unwrap());
        assert!(check_output(None, false, true).unwrap());
        assert!(!check_output(Some(Path::new("x.tar")), true, false).unwrap());
        assert!(check_output(Some(Path::new("x.tar")), true, true).unwrap());
        assert!(check_output(Some(Path::new("x.tar.zst")), false, false).unwrap());
    }

    #[test]
    fn compressor_writes_one_zstd_frame_of_the_pipe() {
        let (r, w) = std::io::pipe().unwrap();
        let dir = std::env::temp_dir().join(format!("thinfs-zst-{}", std::process::id()));
        let out = std::fs::File::create(&dir).unwrap();
        let t = std::thread::spawn(move || compress(OwnedFd::from(r), OwnedFd::from(out)));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = std::fs::File::from(OwnedFd::from(w));
        w.write_all(&data).unwrap();
        drop(w);
        let n = t.join().unwrap().unwrap();
        let z = std::fs::read(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(z.len() as u64, n);
        assert_eq!(zstd::stream::decode_all(&z[..]).unwrap(), data);
    }
}
