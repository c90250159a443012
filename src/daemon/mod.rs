//! The daemon: opens (and recovers) the pool, mounts the FUSE tree, serves
//! until a stop signal or an unmount, then tears everything down. It owns
//! process-level concerns (signals, threads, stale mounts), nothing else.

pub mod control;
pub mod periodic;
pub mod proto;
#[cfg(test)]
mod proto_props;
pub mod server;
pub mod stream;

use crate::engine::{Engine, PoolOptions};
use crate::error::{Error, IoContext, Result};
use crate::fuse::{FuseOptions, ThinFs};
use crate::sys::{creds, mount, process, signals};
use fuser::{Config, MountOption, SessionACL};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Everything `thinfs mount` needs.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Pool to open.
    pub pool: PoolOptions,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// FUSE layer options.
    pub fuse: FuseOptions,
    /// Unmount inner filesystems idle this long.
    pub idle: Duration,
    /// FUSE worker threads.
    pub threads: usize,
    /// Control socket path.
    pub socket: PathBuf,
    /// Serve containerd's Snapshotter API on this socket.
    pub containerd_socket: Option<PathBuf>,
    /// Mount the FUSE view `suid,dev` (setuid programs run with their
    /// owner's rights, device nodes open their devices); default
    /// `nosuid,nodev`.
    pub allow_suid_dev: bool,
}

/// The FUSE mount's options: `nosuid,nodev` unless `allow_suid_dev` (said
/// explicitly either way, not left to fuser's default).
fn mount_options(allow_suid_dev: bool) -> Vec<MountOption> {
    let mut v = vec![
        MountOption::FSName("thinfs".into()),
        MountOption::Subtype("thinfs".into()),
        MountOption::DefaultPermissions,
    ];
    if allow_suid_dev {
        v.extend([MountOption::Suid, MountOption::Dev]);
    } else {
        v.extend([MountOption::NoSuid, MountOption::NoDev]);
    }
    v
}

/// Is `p` a FUSE mount whose daemon is gone ("Transport endpoint is not
/// connected")? Then detach it.
fn clean_stale(p: &Path) -> Result<()> {
    match mount::probe(p) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            log::warn!(
                "{} is a stale mount left by a killed daemon; detaching it",
                p.display()
            );
            mount::umount_lazy(p).ctx(|| format!("detach stale mount {}", p.display()))?;
            Ok(())
        }
        _ => {
            let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            let table = mount::mount_table().ctx(|| "read mount table".into())?;
            if table
                .iter()
                .any(|m| Path::new(&m.point) == canon && m.is_thinfs())
            {
                return Err(Error::Busy(format!(
                    "thinfs is already mounted at {}",
                    p.display()
                )));
            }
            Ok(())
        }
    }
}

/// The directories missing on the way to `p`, `p` first: what creating
/// `p` would make, and what a failed start removes again.
pub fn missing_dirs(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut cur = Some(p);
    while let Some(c) = cur {
        if c.as_os_str().is_empty() || c.symlink_metadata().is_ok() {
            break;
        }
        v.push(c.to_path_buf());
        cur = c.parent();
    }
    v
}

/// Remove what a failed start made of `dirs` (from [`missing_dirs`]):
/// the first with its content when `whole` (a state directory: nothing
/// but this start's pool and log is in it), then each that is empty.
pub fn remove_created(dirs: &[PathBuf], whole: bool) {
    for (i, d) in dirs.iter().enumerate() {
        let r = if i == 0 && whole {
            std::fs::remove_dir_all(d)
        } else {
            std::fs::remove_dir(d)
        };
        if let Err(e) = r
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::warn!("cannot remove {} after the failed start: {e}", d.display());
            return;
        }
    }
}

/// Mount and serve until stopped. `ready` is called once the mount works.
/// A start that fails before that removes the mount point and the state
/// directory if it created them.
pub fn run(cfg: &MountConfig, ready: impl FnOnce()) -> Result<()> {
    let new_mp = missing_dirs(&cfg.mountpoint);
    let new_state = missing_dirs(&cfg.pool.state);
    let mut ready = Some(ready);
    let r = serve(cfg, &mut ready);
    if r.is_err() && ready.is_some() {
        remove_created(&new_mp, false);
        remove_created(&new_state, true);
    }
    r
}

/// [`run`]'s work; `ready` is taken when the mount works.
fn serve<F: FnOnce()>(cfg: &MountConfig, ready: &mut Option<F>) -> Result<()> {
    clean_stale(&cfg.mountpoint)?;
    // New directories 0755 (the state 0700) whatever the umask: with umask
    // 000 they would be 0777 for a moment, and any user could plant or
    // replace what the daemon keeps there.
    crate::sys::scm::create_dirs_0755(&cfg.mountpoint)
        .ctx(|| format!("create mount point {}", cfg.mountpoint.display()))?;
    crate::sys::scm::create_private_dir(&cfg.pool.state)
        .ctx(|| format!("create {}", cfg.pool.state.display()))?;
    signals::block_stop_signals().ctx(|| "block signals".into())?;
    match process::raise_nofile() {
        Ok((old, new)) if old != new => log::info!("open files limit raised from {old} to {new}"),
        Ok((_, n)) => log::info!("open files limit {n} (the hard limit)"),
        Err(e) => log::warn!("cannot raise the open files limit: {e}"),
    }
    creds::drop_supplementary_groups().ctx(|| "drop supplementary groups".into())?;
    let engine = Arc::new(Engine::open_pool(&cfg.pool)?);
    let mut space = crate::engine::space::SpaceGuard::start(engine.clone())?;
    let listener = control::bind(&cfg.socket)?;
    let mut containerd = match &cfg.containerd_socket {
        Some(p) => Some(crate::containerd::Server::start(
            p,
            Arc::new(crate::service::containerd::Snapshotter::new(engine.clone())),
        )?),
        None => None,
    };
    let fs = ThinFs::new(engine.clone(), cfg.fuse.clone());
    let core = fs.core();
    let expirer = core.clone();
    let mut fc = Config::default();
    fc.mount_options = mount_options(cfg.allow_suid_dev);
    fc.acl = SessionACL::All;
    fc.n_threads = Some(cfg.threads.max(1));
    fc.clone_fd = true;
    let mut session = fuser::Session::new(fs, &cfg.mountpoint, &fc)
        .ctx(|| format!("mount FUSE at {}", cfg.mountpoint.display()))?;
    core.set_notifier(session.notifier());
    let mut unmounter = session.unmount_callable();
    core.service().sweep_export_leftovers();
    core.service().sweep_restore_leftovers();
    let mut control =
        server::Server::start(listener, core.service().clone(), server::Limits::default())?;
    let mp = cfg.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals::wait_stop_signal() {
                log::info!("signal {sig}: unmounting {}", mp.display());
                if let Err(e) = unmounter.unmount() {
                    log::error!(
                        "unmount of {} failed: {e}; detaching it lazily",
                        mp.display()
                    );
                    let _ = mount::umount_lazy(&mp);
                }
            }
        })
        .ctx(|| "start signal thread".into())?;
    let idle = cfg.idle;
    let mut expire = periodic::Periodic::start(
        "expire",
        Duration::from_secs(5).min(idle.max(Duration::from_secs(1))),
        move || {
            let n = expirer.expire_idle(idle);
            if n > 0 {
                log::info!("unmounted {n} idle device(s)");
            }
        },
    )?;
    log::info!(
        "thinfs mounted at {} (state {}, control socket {})",
        cfg.mountpoint.display(),
        cfg.pool.state.display(),
        cfg.socket.display()
    );
    if let Some(f) = ready.take() {
        f();
    }
    let r = session.run();
    let _ = std::fs::remove_file(&cfg.socket);
    // The gRPC server holds the engine too: stop and drop it first.
    if let Some(mut c) = containerd.take() {
        c.stop();
    }
    // Every thread that holds the engine stops here, so that it is dropped
    // (and a dm pool torn down) before the process exits.
    control.stop();
    expire.stop();
    space.stop();
    engine.unmount_all();
    drop(core);
    match Arc::try_unwrap(engine) {
        Ok(e) => {
            drop(e);
            log::info!("engine closed");
        }
        Err(e) => log::warn!(
            "engine still held by {} owner(s) at exit; closed by the exit",
            Arc::strong_count(&e) - 1
        ),
    }
    log::info!("thinfs at {} stopped", cfg.mountpoint.display());
    r.ctx(|| "FUSE session".into())
}
