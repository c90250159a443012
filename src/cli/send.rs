//! `thinfs send`, `thinfs receive` and `thinfs haves`. The stream goes
//! through the CLI's own stdout (send) or stdin (receive): their
//! descriptors are passed to the daemon, which reads or writes them
//! directly. A stream is never written to or read from a terminal.
//! Ctrl-C ends this process, which closes the connection: the daemon
//! cancels and undoes.

use super::client;
use super::progress::{bar, show};
use crate::daemon::proto::Op;
use crate::error::{Error, IoContext, Result};
use crate::service::{Haves, ReceiveRequest, SendRequest};
use crate::sys::scm;
use crate::types::Bytes;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// What `thinfs send` was asked.
#[derive(Debug)]
pub struct SendArgs {
    /// `NAME@SNAP`.
    pub target: String,
    /// `-t TOKEN`.
    pub token: Option<String>,
    /// `-i SNAP`.
    pub incremental: Option<String>,
    /// `--haves FILE` (`-` for stdin).
    pub haves: Option<PathBuf>,
    /// `--compress`.
    pub compress: bool,
    /// `-q`.
    pub quiet: bool,
}

fn read_haves(p: &Path) -> Result<Haves> {
    let text = if p == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .ctx(|| "read the haves from stdin".into())?;
        s
    } else {
        std::fs::read_to_string(p).ctx(|| format!("read {}", p.display()))?
    };
    serde_json::from_str(&text).map_err(|e| {
        Error::Invalid(format!(
            "{} is not the output of `thinfs haves NAME --json`: {e}",
            p.display()
        ))
    })
}

/// Run `thinfs send`.
pub fn send(socket: &Path, a: SendArgs) -> Result<()> {
    if scm::is_tty(std::io::stdout()) {
        return Err(Error::Invalid(
            "refusing to write a snapshot stream to a terminal: pipe it (thinfs send NAME@SNAP | thinfs receive NAME) or redirect it to a file".into(),
        ));
    }
    if a.incremental.is_some() && a.haves.is_some() {
        return Err(Error::Invalid(
            "-i and --haves choose the base each: give one of them".into(),
        ));
    }
    let haves = a.haves.as_deref().map(read_haves).transpose()?;
    let pb = bar(a.quiet);
    let stdout = std::io::stdout();
    let v = client::stream(
        socket,
        Op::Send(SendRequest {
            target: a.target.clone(),
            incremental_from: a.incremental,
            haves,
            compress: a.compress,
            resume_token: a.token.clone(),
        }),
        &[stdout.as_fd()],
        |p| show(&pb, p),
    );
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    let v = v?;
    if !a.quiet {
        if v["up_to_date"].as_bool() == Some(true) {
            eprintln!(
                "{}: up to date (the receiver has it); nothing sent",
                a.target
            );
        } else {
            let base = v["base"]
                .as_str()
                .map(|b| format!("incremental from {b}"))
                .unwrap_or_else(|| "full".to_string());
            eprintln!(
                "sent {} ({base}{}): {} stream",
                v["snapshot"].as_str().unwrap_or(&a.target),
                if a.token.is_some() { ", resumed" } else { "" },
                Bytes(v["bytes"].as_u64().unwrap_or(0))
            );
        }
    }
    Ok(())
}

/// Run `thinfs receive`.
pub fn receive(socket: &Path, req: ReceiveRequest, quiet: bool) -> Result<()> {
    if req.abandon {
        // No stream: the daemon reads nothing from this descriptor.
        let null = std::fs::File::open("/dev/null").ctx(|| "open /dev/null".into())?;
        let v = client::stream(socket, Op::Receive(req), &[null.as_fd()], |_| {})?;
        if !quiet {
            eprintln!(
                "abandoned the partial receive of {}",
                v["snapshot"].as_str().unwrap_or("?")
            );
        }
        return Ok(());
    }
    if scm::is_tty(std::io::stdin()) {
        return Err(Error::Invalid(
            "refusing to read a snapshot stream from a terminal: pipe it in (thinfs send NAME@SNAP | thinfs receive NAME)".into(),
        ));
    }
    let pb = bar(quiet);
    let stdin = std::io::stdin();
    let v = client::stream(socket, Op::Receive(req), &[stdin.as_fd()], |p| show(&pb, p));
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    let v = v?;
    if !quiet {
        let what = if v["created_image"].as_bool() == Some(true) {
            "new image"
        } else if v["rolled_back"].as_bool() == Some(true) {
            "changes since the newest snapshot discarded"
        } else {
            "incremental"
        };
        eprintln!(
            "received {} ({what}): {} stream",
            v["snapshot"].as_str().unwrap_or("?"),
            Bytes(v["bytes"].as_u64().unwrap_or(0))
        );
    }
    Ok(())
}

/// `thinfs haves NAME` for humans: one snapshot a line, oldest first.
pub fn haves_text(v: serde_json::Value) -> Result<String> {
    let h: Haves = serde_json::from_value(v)
        .map_err(|e| Error::Invalid(format!("unexpected answer from the daemon: {e}")))?;
    let mut out = format!("{:<24} {:<32} CREATED\n", "SNAPSHOT", "IDENTITY");
    for s in &h.snapshots {
        out.push_str(&format!(
            "{:<24} {:<32} {}\n",
            crate::types::escape(&s.name),
            s.id,
            s.created
        ));
    }
    Ok(out)
}
