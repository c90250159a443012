//! `thinfs backup NAME [--snapshots] -o FILE`, `thinfs backup verify FILE`
//! (no daemon, no pool: this process reads the file) and `thinfs restore
//! FILE [NAME]`. The CLI opens the file as the user ([`Output`]: never
//! through a symbolic link, an existing file only with `--force`) and
//! passes the descriptor; the format is in `service::backup`.

use super::client;
use super::output::Output;
use super::progress::{bar, show};
use crate::daemon::proto::Op;
use crate::error::{Error, Result};
use crate::service::{BackupRequest, RestoreRequest, verify_file};
use crate::types::Bytes;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Run `thinfs backup NAME -o FILE`.
pub fn backup(
    socket: &Path,
    name: String,
    snapshots: bool,
    out: PathBuf,
    force: bool,
    quiet: bool,
) -> Result<()> {
    let f = Output::open(&out, 0o600, force)?;
    let pb = bar(quiet);
    let r = client::stream(
        socket,
        Op::Backup(BackupRequest {
            name: name.clone(),
            snapshots,
        }),
        &[f.file.as_fd()],
        |p| show(&pb, p),
    );
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    match r {
        Ok(v) => {
            if !quiet {
                let n = v["sections"].as_array().map(|a| a.len()).unwrap_or(0);
                let len = f.file.metadata().map(|m| m.len()).unwrap_or(0);
                eprintln!(
                    "backed up {name}: {} snapshot(s) and the head, {}",
                    n.saturating_sub(1),
                    Bytes(len)
                );
            }
            Ok(())
        }
        Err(e) => {
            f.discard();
            Err(e)
        }
    }
}

/// Run `thinfs backup verify FILE`.
pub fn verify(file: PathBuf, quiet: bool) -> Result<()> {
    let mut f =
        std::fs::File::open(&file).map_err(|e| Error::io(format!("open {}", file.display()), e))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let pb = bar(quiet);
    if let Some(b) = &pb {
        b.set_length(len);
    }
    let r = verify_file(&mut f, |n| {
        if let Some(b) = &pb {
            b.inc(n);
        }
    });
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    let idx = r.map_err(|e| Error::BadStream(format!("{}: {e}", file.display())))?;
    println!(
        "{}: ok, image {} from a {} pool, {} section(s):",
        file.display(),
        idx.image,
        idx.backend,
        idx.sections.len()
    );
    for s in &idx.sections {
        println!(
            "  {:<24} {:>10}  {}{}",
            if s.head { "(head)" } else { s.name.as_str() },
            Bytes(s.length).to_string(),
            s.identity,
            s.base
                .as_deref()
                .map(|b| format!(" incremental from {b}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Run `thinfs restore FILE [NAME]`.
pub fn restore(socket: &Path, file: PathBuf, name: Option<String>, quiet: bool) -> Result<()> {
    let shown = name.clone();
    let f =
        std::fs::File::open(&file).map_err(|e| Error::io(format!("open {}", file.display()), e))?;
    let pb = bar(quiet);
    let r = client::stream(
        socket,
        Op::Restore(RestoreRequest { name }),
        &[f.as_fd()],
        |p| show(&pb, p),
    );
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    let v = r?;
    if !quiet {
        eprintln!(
            "restored {} ({} section(s))",
            shown.as_deref().or(v["image"].as_str()).unwrap_or(""),
            v["sections"].as_array().map(|a| a.len()).unwrap_or(0)
        );
    }
    Ok(())
}
