//! The CLI's side of the control socket: one request and its answer, or a
//! streaming request that sends descriptors (SCM_RIGHTS) and reads
//! progress lines until the answer. An answer of another protocol version
//! is reported as such.

use crate::daemon::proto::{Op, Progress, Request, Response, VERSION};
use crate::error::{Error, Result};
use crate::sys::scm;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).map_err(|e| Error::NotRunning {
        socket: socket.display().to_string(),
        why: e.to_string(),
    })
}

fn request_line(op: Op) -> Result<Vec<u8>> {
    let mut line = serde_json::to_vec(&Request { v: VERSION, op })
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    line.push(b'\n');
    Ok(line)
}

/// Decode one line of the daemon; an answer of another version becomes a
/// clear error (its own message, which names the versions, if it failed).
fn decode(socket: &Path, line: &str) -> Result<Response> {
    if line.is_empty() {
        return Err(Error::NotRunning {
            socket: socket.display().to_string(),
            why: "the daemon closed the connection".into(),
        });
    }
    let r: Response = serde_json::from_str(line)
        .map_err(|e| Error::Corrupt(format!("bad answer from daemon: {e}")))?;
    if r.v != VERSION {
        let said = match (&r.error, r.ok) {
            (Some(e), false) => format!(" (the daemon said: {e})"),
            _ => String::new(),
        };
        return Err(Error::Daemon {
            message: format!(
                "the daemon speaks protocol {}, this CLI speaks {VERSION}: use the thinfs CLI of \
                 the running daemon, or restart the daemon with this thinfs{said}",
                r.v
            ),
            errno: libc::EPROTO,
        });
    }
    Ok(r)
}

fn result(r: Response) -> Result<serde_json::Value> {
    if r.ok {
        Ok(r.data.unwrap_or(serde_json::Value::Null))
    } else {
        Err(Error::Daemon {
            message: r.error.unwrap_or_else(|| "unknown error".into()),
            errno: r.errno.unwrap_or(libc::EIO),
        })
    }
}

/// Send one request and return the daemon's data.
pub fn call(socket: &Path, op: Op) -> Result<serde_json::Value> {
    let s = connect(socket)?;
    let line = request_line(op)?;
    let mut w = s.try_clone().map_err(|e| Error::io("control socket", e))?;
    // A daemon that refuses the connection (too many of this user's) has
    // answered and closed before reading: its answer is still to be read.
    let sent = w.write_all(&line);
    let mut resp = String::new();
    let read = BufReader::new(s).read_line(&mut resp);
    if resp.is_empty() {
        sent.map_err(|e| Error::io("send request", e))?;
    }
    read.map_err(|e| Error::io("read answer", e))?;
    result(decode(socket, &resp)?)
}

/// Send a streaming request with `fds`; `progress` sees every progress
/// line. Dropping the connection (this process exiting, Ctrl-C) cancels
/// the operation in the daemon.
pub fn stream(
    socket: &Path,
    op: Op,
    fds: &[BorrowedFd<'_>],
    mut progress: impl FnMut(Progress),
) -> Result<serde_json::Value> {
    let s = connect(socket)?;
    let line = request_line(op)?;
    let mut sent = Some(scm::send_with_fds(s.as_fd(), &line, fds));
    let mut r = BufReader::new(s);
    loop {
        let mut resp = String::new();
        let read = r.read_line(&mut resp);
        if resp.is_empty()
            && let Some(sent) = sent.take()
        {
            sent.map_err(|e| Error::io("send request", e))?;
        }
        read.map_err(|e| Error::io("read answer", e))?;
        let resp = decode(socket, &resp)?;
        match resp.progress {
            Some(p) => progress(p),
            None => return result(resp),
        }
    }
}
