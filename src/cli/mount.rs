//! `thinfs mount` (its flags over the config file) and `thinfs umount`.

use super::config;
use crate::daemon::{self, MountConfig};
use crate::engine::{BackendChoice, PoolOptions};
use crate::error::{Error, IoContext, Result};
use crate::fuse::FuseOptions;
use crate::sys::{mount, process};
use crate::types::Bytes;
use clap::Args;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const READY_ENV: &str = "THINFS_READY_FD";

/// Arguments of `thinfs mount`. Each option overrides the config file.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// State directory (metadata and pool) [default: /var/lib/thinfs]
    #[arg(long)]
    state: Option<PathBuf>,
    /// Block backend: auto, reflink or dm [default: auto]
    #[arg(long)]
    backend: Option<String>,
    /// Size of a new pool; an existing pool keeps its size [default: 64G]
    #[arg(long)]
    pool_size: Option<String>,
    /// Free space below which new images and snapshots are refused [default: 5% of the pool]
    #[arg(long)]
    reserve: Option<String>,
    /// Size of images made by mkdir or `thinfs create` [default: 10G]
    #[arg(long)]
    image_size: Option<String>,
    /// Show .snapshots and lost+found in directory listings
    #[arg(long)]
    show_hidden: bool,
    /// Unmount snapshots and images idle this many seconds [default: 300]
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Members of this group may create, snapshot, clone and destroy, as root may
    #[arg(long)]
    admin_group: Option<String>,
    /// FUSE worker threads [default: 4]
    #[arg(long)]
    threads: Option<usize>,
    /// Also serve containerd's Snapshotter API on this unix socket
    #[arg(long)]
    containerd_socket: Option<PathBuf>,
    /// Let setuid programs and device nodes in images work through the
    /// mount (root decides; default: nosuid,nodev)
    #[arg(long)]
    allow_suid_dev: bool,
    /// Detach once the mount is ready (log goes to STATE/thinfs.log)
    #[arg(long)]
    daemon: bool,
    /// Where to mount
    mountpoint: PathBuf,
}

/// Resolve a group name (or number) to its gid through NSS (getgrnam_r),
/// so groups from LDAP or sssd work as well as those in /etc/group.
fn group_gid(name: &str) -> Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(Error::NotFound(format!(
            "no group named {:?} (looked up through NSS: /etc/group, LDAP, sssd...)",
            crate::types::cut(name, crate::types::MAX_SHOWN)
        ))),
        Err(e) => Err(Error::io(
            format!(
                "look up group {:?}",
                crate::types::cut(name, crate::types::MAX_SHOWN)
            ),
            std::io::Error::from_raw_os_error(e as i32),
        )),
    }
}

/// The daemon's settings: each flag overrides the config file (the
/// socket as [`config::socket`] says).
fn config(a: &MountArgs, socket: Option<&Path>, file: Option<&Path>) -> Result<MountConfig> {
    let f = config::load(file)?;
    let socket = config::socket_or_default(socket, &f);
    let state = a
        .state
        .clone()
        .or(f.state)
        .unwrap_or_else(|| PathBuf::from("/var/lib/thinfs"));
    let mut pool = PoolOptions::new(&state);
    pool.backend = a
        .backend
        .as_deref()
        .or(f.backend.as_deref())
        .unwrap_or("auto")
        .parse::<BackendChoice>()?;
    pool.pool_size = Bytes::parse(
        a.pool_size
            .as_deref()
            .or(f.pool_size.as_deref())
            .unwrap_or("64G"),
    )?;
    pool.reserve = a
        .reserve
        .as_deref()
        .or(f.reserve.as_deref())
        .map(Bytes::parse)
        .transpose()?;
    pool.default_image_size = Bytes::parse(
        a.image_size
            .as_deref()
            .or(f.image_size.as_deref())
            .unwrap_or("10G"),
    )?;
    let admin_group = match a.admin_group.clone().or(f.admin_group) {
        Some(g) => Some((g.clone(), group_gid(&g)?)),
        None => None,
    };
    Ok(MountConfig {
        pool,
        mountpoint: a.mountpoint.clone(),
        fuse: FuseOptions {
            show_hidden: a.show_hidden || f.show_hidden.unwrap_or(false),
            admin_group,
            ..FuseOptions::default()
        },
        idle: Duration::from_secs(a.idle_secs.or(f.idle_secs).unwrap_or(300)),
        threads: a.threads.or(f.threads).unwrap_or(4),
        socket,
        containerd_socket: a.containerd_socket.clone().or(f.containerd_socket),
        allow_suid_dev: a.allow_suid_dev || f.allow_suid_dev.unwrap_or(false),
    })
}

fn init_log() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

/// `thinfs mount`; `socket` and `file` are the global `--socket` and
/// `--config` (or their variables).
pub fn mount(a: MountArgs, socket: Option<&Path>, file: Option<&Path>) -> Result<()> {
    let cfg = config(&a, socket, file)?;
    if process::euid() != 0 {
        return Err(Error::PermissionDenied(
            "thinfs mount needs root (loop devices, mounts, /dev/fuse)".into(),
        ));
    }
    if a.daemon {
        return spawn_daemon(&cfg);
    }
    init_log();
    let ready_fd = std::env::var(READY_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok());
    if ready_fd.is_some() {
        let _ = process::setsid();
    }
    daemon::run(&cfg, || {
        if let Some(n) = ready_fd
            && let Ok(mut f) = process::inherited_fd(n)
        {
            let _ = f.write_all(b"1");
        }
    })
}

/// Re-run ourselves in the background and wait until the mount is ready.
fn spawn_daemon(cfg: &MountConfig) -> Result<()> {
    let state = &cfg.pool.state;
    crate::sys::scm::create_private_dir(state).ctx(|| format!("create {}", state.display()))?;
    let log_path = state.join("thinfs.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&log_path)
        .ctx(|| format!("open {}", log_path.display()))?;
    let (mut rd, wr) = process::ready_pipe().ctx(|| "make a pipe".into())?;
    let exe = std::env::current_exe().ctx(|| "find own executable".into())?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|x| x != "--daemon")
        .collect();
    let wr_num = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let child = std::process::Command::new(exe)
        .args(&args)
        .env(READY_ENV, wr_num.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().ctx(|| "dup log".into())?)
        .stderr(log)
        .spawn()
        .ctx(|| "start the daemon".into())?;
    drop(wr);
    let mut b = [0u8; 1];
    match rd.read(&mut b) {
        Ok(1) => {
            println!(
                "thinfs mounted at {} (pid {}, log {}, control socket {})",
                cfg.mountpoint.display(),
                child.id(),
                log_path.display(),
                cfg.socket.display()
            );
            Ok(())
        }
        _ => {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            Err(Error::Invalid(format!(
                "the daemon failed to mount; last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )))
        }
    }
}

/// `thinfs umount`.
pub fn umount(mp: &Path) -> Result<()> {
    match mount::probe(mp) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            mount::umount_lazy(mp).ctx(|| format!("detach stale mount {}", mp.display()))?;
            println!("detached stale mount {}", mp.display());
            return Ok(());
        }
        Err(e) => return Err(Error::io(format!("{}", mp.display()), e)),
        Ok(_) => {}
    }
    let canon = std::fs::canonicalize(mp).ctx(|| format!("resolve {}", mp.display()))?;
    let table = mount::mount_table().ctx(|| "read mount table".into())?;
    if !table
        .iter()
        .any(|m| Path::new(&m.point) == canon && m.is_thinfs())
    {
        return Err(Error::Invalid(format!(
            "thinfs is not mounted at {}",
            mp.display()
        )));
    }
    mount::umount(&canon).ctx(|| format!("unmount {}", mp.display()))?;
    Ok(())
}
