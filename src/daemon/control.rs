//! The control socket's requests: binds the socket, reads one request line
//! of a connection, decodes it, calls the filesystem core as the peer
//! (credentials and groups taken at connect), answers. A malformed request
//! gets an error answer, and one log line with the input cut. Connections
//! and threads are the business of [`super::server`].

use super::proto::{Op, Request, Response, VERSION};
use crate::engine::Target;
use crate::error::{Error, IoContext, Result};
use crate::fuse::Core;
use crate::lograte;
use crate::service::Caller;
use crate::types::{Bytes, MAX_SHOWN, Name, cut, escape};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Bind the socket at `path` (any user may connect; rights are checked per
/// request). A leftover socket file of a dead daemon is replaced; a live one
/// is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Busy(format!(
                "another thinfs daemon answers on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).ctx(|| format!("remove stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).ctx(|| format!("bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .ctx(|| format!("open {} to all users", path.display()))?;
    Ok(l)
}

/// One client connection: its stream, who is at the other end (taken at
/// connect), bytes read past the last request line, and when it last did
/// something.
pub struct Conn {
    pub(super) stream: UnixStream,
    pub(super) who: Caller,
    buf: Vec<u8>,
    pub(super) since: Instant,
}

impl Conn {
    pub(super) fn new(stream: UnixStream, who: Caller) -> Conn {
        Conn {
            stream,
            who,
            buf: Vec::new(),
            since: Instant::now(),
        }
    }

    /// Is a whole request line already read?
    pub(super) fn has_line(&self) -> bool {
        self.buf.contains(&b'\n')
    }

    /// Read until a whole line is buffered, for at most `limit`.
    /// `Ok(None)`: the peer closed the connection.
    fn read_line(&mut self, limit: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + limit;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                return Ok(Some(std::mem::replace(&mut self.buf, rest)));
            }
            if self.buf.len() as u64 >= MAX_LINE {
                return Err(Error::Invalid("request longer than 64 KiB".into()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Invalid(format!(
                    "request not complete within {} s",
                    limit.as_secs()
                )));
            }
            self.stream
                .set_read_timeout(Some(left))
                .ctx(|| "control socket timeout".into())?;
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(Error::Invalid("request line without its end".into())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(Error::io("read request", e)),
            }
        }
    }
}

/// Log a line about a request of `who`, within its uid's rate limit.
fn log_limited(level: log::Level, who: &Caller, msg: std::fmt::Arguments<'_>) {
    if let Some(d) = lograte::CONTROL.allow(u64::from(who.uid)) {
        log::log!(
            level,
            "control: uid {}: {msg}{}",
            who.uid,
            lograte::dropped_note(d)
        );
    }
}

/// Serve one request of `c` (reading it within `limit`). Returns whether
/// the connection stays open.
pub fn serve_one(core: &Core, c: &mut Conn, limit: Duration) -> bool {
    let line = match c.read_line(limit) {
        Ok(Some(l)) => l,
        Ok(None) => return false,
        Err(e) => {
            log_limited(
                log::Level::Warn,
                &c.who,
                format_args!("{}", shown(&e.to_string())),
            );
            let _ = send(&mut c.stream, Err(e), limit);
            return false;
        }
    };
    let line = String::from_utf8_lossy(&line);
    if line.trim().is_empty() {
        return true;
    }
    let res = match serde_json::from_str::<Request>(&line) {
        Ok(req) if req.v != VERSION => Err(Error::Invalid(format!(
            "protocol version {} not supported (daemon speaks {VERSION})",
            req.v
        ))),
        Ok(req) => {
            let r = handle(core, &c.who, &req.op);
            match &r {
                Ok(_) if req.op.is_change() => log_limited(
                    log::Level::Info,
                    &c.who,
                    format_args!("{}: ok", req.op.summary()),
                ),
                Ok(_) => {}
                Err(e) => log_limited(
                    if req.op.is_change() || e.errno() == libc::EINVAL {
                        log::Level::Warn
                    } else {
                        log::Level::Debug
                    },
                    &c.who,
                    format_args!("{}: {}", req.op.summary(), shown(&e.to_string())),
                ),
            }
            r
        }
        Err(e) => {
            let e = Error::Invalid(format!(
                "malformed request: {}",
                cut(&e.to_string(), MAX_SHOWN * 2)
            ));
            log_limited(
                log::Level::Warn,
                &c.who,
                format_args!("{}", shown(&e.to_string())),
            );
            Err(e)
        }
    };
    c.since = Instant::now();
    send(&mut c.stream, res, limit).is_ok()
}

/// Error text as logged: cut, and escaped to one line.
fn shown(s: &str) -> String {
    escape(&cut(s, 3 * MAX_SHOWN)).into_owned()
}

/// The answer line for `r`.
pub fn answer(r: Result<serde_json::Value>) -> Vec<u8> {
    let resp = match r {
        Ok(data) => Response {
            v: VERSION,
            ok: true,
            data: Some(data),
            error: None,
            errno: None,
        },
        Err(e) => Response {
            v: VERSION,
            ok: false,
            data: None,
            error: Some(e.to_string()),
            errno: Some(e.errno()),
        },
    };
    let mut line = serde_json::to_vec(&resp).unwrap_or_default();
    line.push(b'\n');
    line
}

fn send(
    out: &mut UnixStream,
    r: Result<serde_json::Value>,
    limit: Duration,
) -> std::io::Result<()> {
    out.set_write_timeout(Some(limit))?;
    out.write_all(&answer(r))
}

fn to_json<T: serde::Serialize>(v: T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Corrupt(format!("encode: {e}")))
}

/// Parse `NAME@NEW` / `NEW` as the new name of a rename of `from` (a new
/// name: see [`Name::fresh`]).
fn new_name(from: &Target, to: &str) -> Result<Name> {
    let n = new_name_any(from, to)?;
    Name::fresh(n.as_str())
}

fn new_name_any(from: &Target, to: &str) -> Result<Name> {
    match (&from.snap, Target::parse(to)?) {
        (
            Some(_),
            Target {
                image,
                snap: Some(s),
            },
        ) if image == from.image => Ok(s),
        (Some(_), Target { snap: Some(_), .. }) => Err(Error::CrossDevice(format!(
            "a snapshot stays in its image: cannot rename {from} to {to}"
        ))),
        (_, Target { image, snap: None }) => Ok(image),
        (None, Target { snap: Some(_), .. }) => Err(Error::Invalid(format!(
            "an image cannot become a snapshot ({to})"
        ))),
    }
}

fn handle(core: &Core, who: &Caller, op: &Op) -> Result<serde_json::Value> {
    let e = core.engine();
    match op {
        Op::List { kind } => {
            let want = match kind.as_str() {
                "all" => None,
                "image" => Some(crate::types::DeviceKind::Image),
                "snapshot" => Some(crate::types::DeviceKind::Snapshot),
                "containerd" => Some(crate::types::DeviceKind::Containerd),
                k => {
                    return Err(Error::Invalid(format!(
                        "unknown type {k:?} (image, snapshot, containerd, all)"
                    )));
                }
            };
            let all = core.devices_with_usage()?;
            let v: Vec<_> = all
                .iter()
                .filter(|d| want.is_none_or(|k| d.record.kind == k))
                .collect();
            to_json(v)
        }
        Op::Tree => to_json(e.list_info(false)?),
        Op::Info { target } => to_json(e.info(&e.resolve(&Target::parse(target)?)?, true)?),
        Op::Usage => to_json(&*core.devices_with_usage()?),
        Op::Pool => to_json(e.pool_info()?),
        Op::Create { name, size } => {
            let size = size.as_deref().map(Bytes::parse).transpose()?;
            to_json(core.service().create_info(who, &Name::fresh(name)?, size)?)
        }
        Op::Snapshot { target } => {
            let t = Target::parse(target)?;
            if let Some(snap) = &t.snap {
                Name::fresh(snap.as_str())?;
            }
            to_json(core.service().snapshot(who, &t)?)
        }
        Op::Clone { source, name } => to_json(core.service().clone_snapshot(
            who,
            &Target::parse(source)?,
            &Name::fresh(name)?,
        )?),
        Op::Rollback {
            target,
            destroy_newer,
        } => {
            core.service()
                .rollback(who, &Target::parse(target)?, *destroy_newer)?;
            Ok(serde_json::Value::Null)
        }
        Op::Destroy { target, recursive } => {
            core.service()
                .destroy(who, &Target::parse(target)?, *recursive)?;
            Ok(serde_json::Value::Null)
        }
        Op::Rename { from, to } => {
            let f = Target::parse(from)?;
            let n = new_name(&f, to)?;
            core.service().rename(who, &f, &n)?;
            Ok(serde_json::Value::Null)
        }
        Op::Resize { name, size } => {
            core.service()
                .resize(who, &Target::parse(name)?, Bytes::parse(size)?)?;
            Ok(serde_json::Value::Null)
        }
        Op::Fsck { target } => {
            let (code, output) = core.service().fsck(who, &Target::parse(target)?)?;
            Ok(serde_json::json!({ "exit": code, "output": output }))
        }
        Op::Label { target, key, value } => {
            core.service()
                .label(who, &Target::parse(target)?, key, value.as_deref())?;
            Ok(serde_json::Value::Null)
        }
    }
}
