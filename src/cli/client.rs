//! The CLI's side of the control socket.

use crate::daemon::proto::{Op, Request, Response, VERSION};
use crate::error::{Error, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Send one request and return the daemon's data.
pub fn call(socket: &Path, op: Op) -> Result<serde_json::Value> {
    let s = UnixStream::connect(socket).map_err(|e| Error::NotRunning {
        socket: socket.display().to_string(),
        why: e.to_string(),
    })?;
    let mut line = serde_json::to_vec(&Request { v: VERSION, op })
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    line.push(b'\n');
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
    if resp.is_empty() {
        return Err(Error::NotRunning {
            socket: socket.display().to_string(),
            why: "the daemon closed the connection".into(),
        });
    }
    let r: Response = serde_json::from_str(&resp)
        .map_err(|e| Error::Corrupt(format!("bad answer from daemon: {e}")))?;
    if r.ok {
        Ok(r.data.unwrap_or(serde_json::Value::Null))
    } else {
        Err(Error::Daemon {
            message: r.error.unwrap_or_else(|| "unknown error".into()),
            errno: r.errno.unwrap_or(libc::EIO),
        })
    }
}
