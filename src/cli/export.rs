//! `thinfs export NAME[@SNAP] [-o FILE]`: the CLI opens the output itself
//! (so the user's own rights apply to it), passes the descriptor to the
//! daemon, and shows progress on stderr when stderr is a terminal. A
//! tarball is never written to a terminal. Ctrl-C ends this process,
//! which closes the connection: the daemon cancels and undoes.

use super::client;
use super::progress::bar;
use crate::daemon::proto::{Op, Progress};
use crate::error::{Error, Result};
use crate::service::ExportRequest;
use crate::sys::scm;
use crate::types::Bytes;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where the tarball goes.
enum Output {
    Stdout,
    File { path: PathBuf, created: bool },
}

/// Refuse outputs that cannot be right: a terminal, a compressed name.
fn check_output(out: Option<&Path>, stdout_is_tty: bool) -> Result<()> {
    match out {
        None if stdout_is_tty => Err(Error::Invalid(
            "refusing to write a tarball to a terminal: use -o FILE or a pipe".into(),
        )),
        Some(p) if p.extension().is_some_and(|e| e == "zst" || e == "zstd") => {
            Err(Error::Invalid(format!(
                "compression is not built in: pipe the tarball, e.g. `thinfs export NAME | zstd -o {}`",
                p.display()
            )))
        }
        _ => Ok(()),
    }
}

/// Run `thinfs export`.
pub fn export(socket: &Path, target: String, out: Option<PathBuf>, quiet: bool) -> Result<()> {
    let out = out.filter(|p| p != Path::new("-"));
    check_output(out.as_deref(), scm::is_tty(std::io::stdout()))?;
    let (file, dest) = match &out {
        None => (None, Output::Stdout),
        Some(p) => {
            let existed = std::fs::symlink_metadata(p).is_ok();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o666)
                .open(p)
                .map_err(|e| Error::io(format!("open {}", p.display()), e))?;
            (
                Some(f),
                Output::File {
                    path: p.clone(),
                    created: !existed,
                },
            )
        }
    };
    let stdout = std::io::stdout();
    let fd = match &file {
        Some(f) => f.as_fd(),
        None => stdout.as_fd(),
    };
    let pb = bar(quiet);
    let r = client::stream(
        socket,
        Op::Export(ExportRequest {
            target: target.clone(),
        }),
        &[fd],
        |p: Progress| {
            if let Some(b) = &pb {
                if let Some(t) = p.total {
                    b.set_length(t.max(p.done));
                }
                b.set_position(p.done);
            }
        },
    );
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    drop(file);
    match r {
        Ok(v) => {
            if !quiet {
                eprintln!(
                    "exported {target}: {} entries, {} of files, {} tarball",
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
            if let Output::File {
                path,
                created: true,
            } = &dest
            {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_and_compressed_outputs_are_refused() {
        let e = check_output(None, true).unwrap_err().to_string();
        assert!(e.contains("terminal"), "{e}");
        assert!(check_output(None, false).is_ok());
        assert!(check_output(Some(Path::new("x.tar")), true).is_ok());
        let e = check_output(Some(Path::new("x.tar.zst")), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("zstd"), "{e}");
    }
}
