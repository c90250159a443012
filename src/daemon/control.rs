//! The control socket's requests: binds the socket, reads one request line
//! of a connection (with the descriptors sent on it), decodes it, calls
//! the service as the peer (credentials and groups taken at connect),
//! answers. A malformed request, or one of another protocol version, gets
//! an error answer, and one log line with the input cut.
//!
//! Descriptors (SCM_RIGHTS) are taken only with the first bytes of a
//! request, at most [`MAX_REQUEST_FDS`]; the kernel closes any other
//! without installing it (no control buffer after the first bytes), and
//! the connection that sent them is answered with an error, closed and
//! logged (rate-limited, with the sender's uid and pid). So a connection
//! holds at most [`MAX_REQUEST_FDS`] received descriptors, only while one
//! worker reads its request, and [`super::server`] bounds connections per
//! uid: what one uid makes the daemon hold is bounded. A streaming
//! request is handed back to the caller to run ([`Served::Stream`], see
//! [`super::stream`]). Connections and threads are the business of
//! [`super::server`].

use super::proto::{DeviceView, Op, Request, Response, VERSION, version_mismatch};
use crate::engine::Target;
use crate::error::{Error, IoContext, Result};
use crate::lograte;
use crate::service::{Caller, Service};
use crate::sys::scm;
use crate::types::{Bytes, MAX_SHOWN, Name, cut, escape};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Most descriptors a request takes: every streaming verb (export, send,
/// receive, import, backup, restore) takes one, its input or output
/// ([`Op::fds`]). A connection holds at most this many received
/// descriptors at any time.
pub const MAX_REQUEST_FDS: usize = 1;

/// Bind the socket at `path` (any user may connect; rights are checked per
/// request), mode 0666 from the start, its missing directories 0755 (see
/// [`scm::bind_unix`]). A leftover socket file of a dead daemon is
/// replaced; a live one is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() && UnixStream::connect(path).is_ok() {
        return Err(Error::Busy(format!(
            "another thinfs daemon answers on {}",
            path.display()
        )));
    }
    // Mode 0666 from the moment it is there, whatever the umask; a stale
    // socket is replaced by the rename.
    scm::bind_unix(path, 0o666).ctx(|| format!("bind control socket {}", path.display()))
}

/// One client connection: its stream, who is at the other end (taken at
/// connect), bytes read past the last request line, and when it last did
/// something.
pub struct Conn {
    pub(super) stream: UnixStream,
    pub(super) who: Caller,
    buf: Vec<u8>,
    /// Descriptors received with the first bytes of the request in `buf`
    /// (at most [`MAX_REQUEST_FDS`]).
    fds: Vec<OwnedFd>,
    pub(super) since: Instant,
}

/// What became of a connection after one request.
pub enum Served {
    /// Answered; the connection stays open.
    Keep,
    /// Answered (or gone); close it.
    Close,
    /// A streaming request, read and checked, to be run with its
    /// descriptors; the connection belongs to the stream from now on.
    Stream(Op, Vec<OwnedFd>),
}

impl Conn {
    pub(super) fn new(stream: UnixStream, who: Caller) -> Conn {
        Conn {
            stream,
            who,
            buf: Vec::new(),
            fds: Vec::new(),
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
            // Descriptors are taken only with the first bytes of a request
            // (the client attaches them to its first byte); the kernel
            // closes any other without installing it.
            let max = if self.buf.is_empty() {
                MAX_REQUEST_FDS.saturating_sub(self.fds.len())
            } else {
                0
            };
            match scm::recv_with_fds(self.stream.as_fd(), &mut chunk, &mut self.fds, max) {
                Ok(r) if r.refused => {
                    self.fds.clear();
                    return Err(Error::Invalid(format!(
                        "descriptors sent after the first byte of a request, or more than \
                         {MAX_REQUEST_FDS} with it (pid {}): closed, with the connection",
                        self.who.pid
                    )));
                }
                Ok(r) if r.bytes == 0 && self.buf.is_empty() => return Ok(None),
                Ok(r) if r.bytes == 0 => {
                    return Err(Error::Invalid("request line without its end".into()));
                }
                Ok(r) => self.buf.extend_from_slice(&chunk[..r.bytes]),
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

/// Decode a request line: its version first, so that a request of
/// another version gets an answer naming both versions, whatever its
/// operations look like.
fn decode(line: &str) -> Result<Request> {
    let bad = |e: serde_json::Error| {
        Error::Invalid(format!(
            "malformed request: {}",
            cut(&e.to_string(), MAX_SHOWN * 2)
        ))
    };
    let v: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
    match v.get("v").and_then(|v| v.as_u64()) {
        Some(n) if n == u64::from(VERSION) => serde_json::from_value(v).map_err(bad),
        Some(n) => Err(Error::Invalid(version_mismatch(n))),
        None => Err(Error::Invalid(
            "malformed request: no protocol version \"v\"".into(),
        )),
    }
}

/// Serve one request of `c` (reading it within `limit`).
pub fn serve_one(service: &Service, c: &mut Conn, limit: Duration) -> Served {
    let line = match c.read_line(limit) {
        Ok(Some(l)) => l,
        Ok(None) => return Served::Close,
        Err(e) => {
            log_limited(
                log::Level::Warn,
                &c.who,
                format_args!("{}", shown(&e.to_string())),
            );
            let _ = send(&mut c.stream, Err(e), limit);
            return Served::Close;
        }
    };
    // Descriptors belong to the line they came with.
    let fds = std::mem::take(&mut c.fds);
    let line = String::from_utf8_lossy(&line);
    if line.trim().is_empty() {
        return Served::Keep;
    }
    let res = match decode(&line) {
        Ok(req) if req.op.fds() != fds.len() => Err(Error::Invalid(format!(
            "{} needs {} descriptor(s), {} came with it",
            req.op.summary(),
            req.op.fds(),
            fds.len()
        ))),
        Ok(req) if req.op.fds() > 0 => return Served::Stream(req.op, fds),
        Ok(req) => {
            let r = handle(service, &c.who, &req.op);
            log_outcome(&c.who, &req.op, &r);
            r
        }
        Err(e) => {
            log_limited(
                log::Level::Warn,
                &c.who,
                format_args!("{}", shown(&e.to_string())),
            );
            Err(e)
        }
    };
    c.since = Instant::now();
    if send(&mut c.stream, res, limit).is_ok() {
        Served::Keep
    } else {
        Served::Close
    }
}

/// Log the outcome of a request of `who` (changes and failures).
pub(super) fn log_outcome<T>(who: &Caller, op: &Op, r: &Result<T>) {
    match r {
        Ok(_) if op.is_change() || op.fds() > 0 => {
            log_limited(log::Level::Info, who, format_args!("{}: ok", op.summary()))
        }
        Ok(_) => {}
        Err(e) => log_limited(
            if op.is_change() || op.fds() > 0 || e.errno() == libc::EINVAL {
                log::Level::Warn
            } else {
                log::Level::Debug
            },
            who,
            format_args!("{}: {}", op.summary(), shown(&e.to_string())),
        ),
    }
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
            progress: None,
            ok: true,
            data: Some(data),
            error: None,
            errno: None,
        },
        Err(e) => Response {
            v: VERSION,
            progress: None,
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

pub(super) fn send(
    out: &mut UnixStream,
    r: Result<serde_json::Value>,
    limit: Duration,
) -> std::io::Result<()> {
    out.set_write_timeout(Some(limit))?;
    out.write_all(&answer(r))
}

pub(super) fn to_json<T: serde::Serialize>(v: T) -> Result<serde_json::Value> {
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

/// The devices as the CLI prints them.
fn views(v: &[&crate::engine::DeviceInfo]) -> Vec<DeviceView> {
    v.iter().map(|d| DeviceView::from(*d)).collect()
}

fn handle(service: &Service, who: &Caller, op: &Op) -> Result<serde_json::Value> {
    let e = service.engine();
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
            let all = service.devices_with_usage()?;
            let v: Vec<_> = all
                .iter()
                .filter(|d| want.is_none_or(|k| d.record.kind == k))
                .collect();
            to_json(views(&v))
        }
        Op::Tree => to_json(views(&e.list_info(false)?.iter().collect::<Vec<_>>())),
        Op::Info { target } => {
            let r = e.resolve_info(&Target::parse(target)?)?;
            to_json(DeviceView::from(&service.info_with_usage(r.id)?))
        }
        Op::Usage => to_json(views(
            &service.devices_with_usage()?.iter().collect::<Vec<_>>(),
        )),
        Op::Pool => to_json(e.pool_info()?),
        Op::Partials => to_json(e.partial_receives()?),
        Op::Create { name, size } => {
            let size = size.as_deref().map(Bytes::parse).transpose()?;
            to_json(service.create_info(who, &Name::fresh(name)?, size)?)
        }
        Op::Snapshot { target } => {
            let t = Target::parse(target)?;
            if let Some(snap) = &t.snap {
                Name::fresh(snap.as_str())?;
            }
            to_json(service.snapshot(who, &t)?)
        }
        Op::Clone { source, name } => {
            to_json(service.clone_snapshot(who, &Target::parse(source)?, &Name::fresh(name)?)?)
        }
        Op::Rollback {
            target,
            destroy_newer,
        } => {
            service.rollback(who, &Target::parse(target)?, *destroy_newer)?;
            Ok(serde_json::Value::Null)
        }
        Op::Destroy { target, recursive } => {
            service.destroy(who, &Target::parse(target)?, *recursive)?;
            Ok(serde_json::Value::Null)
        }
        Op::Rename { from, to } => {
            let f = Target::parse(from)?;
            let n = new_name(&f, to)?;
            service.rename(who, &f, &n)?;
            Ok(serde_json::Value::Null)
        }
        Op::Resize { name, size } => {
            service.resize(who, &Target::parse(name)?, Bytes::parse(size)?)?;
            Ok(serde_json::Value::Null)
        }
        Op::Fsck { target } => {
            let (code, output) = service.fsck(who, &Target::parse(target)?)?;
            Ok(serde_json::json!({ "exit": code, "output": output }))
        }
        Op::Label { target, key, value } => {
            service.label(who, &Target::parse(target)?, key, value.as_deref())?;
            Ok(serde_json::Value::Null)
        }
        Op::Haves { image } => to_json(service.haves(who, &Name::new(image)?)?),
        Op::Export(_)
        | Op::Send(_)
        | Op::Receive(_)
        | Op::Import(_)
        | Op::Backup(_)
        | Op::Restore(_) => Err(Error::Invalid(format!(
            "{} is a streaming request",
            op.summary()
        ))),
    }
}
