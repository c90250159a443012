//! The control socket: accepts connections, reads the peer's credentials
//! (SO_PEERCRED), decodes requests, calls the filesystem core, answers.
//! A malformed request gets an error answer; the server keeps serving.

use super::proto::{Op, Request, Response, VERSION};
use crate::engine::Target;
use crate::error::{Error, IoContext, Result};
use crate::fuse::{Caller, Core};
use crate::sys::socket;
use crate::types::{Bytes, Name};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

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

/// Serve connections forever (one thread per connection).
pub fn serve(l: UnixListener, core: Arc<Core>) {
    for conn in l.incoming() {
        match conn {
            Ok(s) => {
                let core = core.clone();
                let _ = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || connection(s, &core));
            }
            Err(e) => log::warn!("control socket accept: {e}"),
        }
    }
}

fn connection(s: UnixStream, core: &Core) {
    let who = match socket::peer_cred(&s) {
        Ok((pid, uid, gid)) => Caller {
            uid,
            gid,
            pid,
            groups: None,
        },
        Err(e) => {
            log::warn!("control socket: cannot read peer credentials: {e}");
            return;
        }
    };
    let Ok(mut out) = s.try_clone() else { return };
    let mut rd = BufReader::new(s);
    loop {
        let mut line = String::new();
        match std::io::Read::by_ref(&mut rd)
            .take(MAX_LINE)
            .read_line(&mut line)
        {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let _ = reply(
                    &mut out,
                    Err(Error::Invalid(format!("unreadable request: {e}"))),
                );
                return;
            }
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            let _ = reply(
                &mut out,
                Err(Error::Invalid("request longer than 64 KiB".into())),
            );
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let res = match serde_json::from_str::<Request>(&line) {
            Ok(req) if req.v != VERSION => Err(Error::Invalid(format!(
                "protocol version {} not supported (daemon speaks {VERSION})",
                req.v
            ))),
            Ok(req) => {
                let r = handle(core, &who, &req.op);
                if req.op.is_change() {
                    match &r {
                        Ok(_) => log::info!("control: uid {} {:?}: ok", who.uid, req.op),
                        Err(e) => log::warn!("control: uid {} {:?}: {e}", who.uid, req.op),
                    }
                }
                r
            }
            Err(e) => {
                log::warn!("control: malformed request from uid {}: {e}", who.uid);
                Err(Error::Invalid(format!("malformed request: {e}")))
            }
        };
        if reply(&mut out, res).is_err() {
            return;
        }
    }
}

fn reply(out: &mut UnixStream, r: Result<serde_json::Value>) -> std::io::Result<()> {
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
    out.write_all(&line)
}

fn to_json<T: serde::Serialize>(v: T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Corrupt(format!("encode: {e}")))
}

/// Parse `NAME@NEW` / `NEW` as the new name of a rename of `from`.
fn new_name(from: &Target, to: &str) -> Result<Name> {
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
                "image" => Some(crate::meta::DeviceKind::Image),
                "snapshot" => Some(crate::meta::DeviceKind::Snapshot),
                k => {
                    return Err(Error::Invalid(format!(
                        "unknown type {k:?} (image, snapshot, all)"
                    )));
                }
            };
            let v: Vec<_> = e
                .list_info(true)?
                .into_iter()
                .filter(|d| want.is_none_or(|k| d.record.kind == k))
                .collect();
            to_json(v)
        }
        Op::Tree => to_json(e.list_info(false)?),
        Op::Info { target } => to_json(e.info(&e.resolve(&Target::parse(target)?)?, true)?),
        Op::Usage => to_json(e.list_info(true)?),
        Op::Pool => to_json(e.pool_info()?),
        Op::Create { name, size } => {
            let size = size.as_deref().map(Bytes::parse).transpose()?;
            to_json(core.admin_create(who, &Name::new(name)?, size)?)
        }
        Op::Snapshot { target } => to_json(core.admin_snapshot(who, &Target::parse(target)?)?),
        Op::Clone { source, name } => {
            to_json(core.admin_clone(who, &Target::parse(source)?, &Name::new(name)?)?)
        }
        Op::Rollback {
            target,
            destroy_newer,
        } => {
            core.admin_rollback(who, &Target::parse(target)?, *destroy_newer)?;
            Ok(serde_json::Value::Null)
        }
        Op::Destroy { target, recursive } => {
            core.admin_destroy(who, &Target::parse(target)?, *recursive)?;
            Ok(serde_json::Value::Null)
        }
        Op::Rename { from, to } => {
            let f = Target::parse(from)?;
            let n = new_name(&f, to)?;
            core.admin_rename(who, &f, &n)?;
            Ok(serde_json::Value::Null)
        }
        Op::Resize { name, size } => {
            core.admin_resize(who, &Target::parse(name)?, Bytes::parse(size)?)?;
            Ok(serde_json::Value::Null)
        }
        Op::Fsck { target } => {
            let (code, output) = core.admin_fsck(who, &Target::parse(target)?)?;
            Ok(serde_json::json!({ "exit": code, "output": output }))
        }
        Op::Label { target, key, value } => {
            core.admin_label(who, &Target::parse(target)?, key, value.as_deref())?;
            Ok(serde_json::Value::Null)
        }
    }
}
