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
    #[arg(long, value_parser = ["auto", "reflink", "dm"])]
    backend: Option<String>,
    /// Size of a new pool; an existing pool keeps its size [default: 64G]
    #[arg(long, value_parser = super::size_arg)]
    pool_size: Option<String>,
    /// Free space below which new images and snapshots are refused [default: 5% of the pool]
    #[arg(long, value_parser = super::size_arg)]
    reserve: Option<String>,
    /// Size of images made by mkdir or `thinfs create` [default: 10G]
    #[arg(long, value_parser = super::size_arg)]
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
/// `--config` (or their variables). The exit code, once the daemon stops
/// (or, with `--daemon`, once it is ready or has failed and said why).
pub fn mount(a: MountArgs, socket: Option<&Path>, file: Option<&Path>) -> Result<i32> {
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
    // The write end of `--daemon`'s pipe, close-on-exec from here on (a
    // tool the daemon runs must not hold it open).
    let ready_pipe = std::env::var(READY_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .and_then(|n| process::inherited_fd(n).ok())
        .and_then(|f| f.try_clone().ok());
    if ready_pipe.is_some() {
        let _ = process::setsid();
    }
    let pipe = std::cell::RefCell::new(ready_pipe);
    let r = daemon::run(&cfg, || {
        if let Some(mut f) = pipe.borrow_mut().take() {
            let _ = f.write_all(READY);
        }
    });
    // Not ready: the reason goes to the waiting `thinfs mount --daemon`.
    if let (Err(e), Some(mut f)) = (&r, pipe.into_inner()) {
        let _ = f.write_all(format!("{FAILED}{e}").as_bytes());
    }
    r.map(|()| 0)
}

/// What the daemon writes on `--daemon`'s pipe when its mount works.
const READY: &[u8] = b"1";
/// What precedes the reason it writes there when it failed.
const FAILED: &str = "!";
/// Most bytes of the reason read from the pipe.
const MAX_REASON: u64 = 64 << 10;
/// Most lines of the failed run's log shown after the reason.
const MAX_LOG_LINES: usize = 10;

/// Re-run ourselves in the background and wait until the mount is ready.
/// If it fails: its reason first, on a line of its own, then the warnings
/// and errors it logged (of this run only); the state directory and the
/// mount point are gone again if this start made them. `Ok(1)`: the
/// failure is reported.
fn spawn_daemon(cfg: &MountConfig) -> Result<i32> {
    let state = &cfg.pool.state;
    let new_state = daemon::missing_dirs(state);
    let new_mp = daemon::missing_dirs(&cfg.mountpoint);
    crate::sys::scm::create_private_dir(state).ctx(|| format!("create {}", state.display()))?;
    let log_path = state.join("thinfs.log");
    let r = start_child(&log_path);
    let (reason, log_start) = match r {
        Ok(Started::Ready(pid)) => {
            println!(
                "thinfs mounted at {} (pid {pid}, log {}, control socket {})",
                cfg.mountpoint.display(),
                log_path.display(),
                cfg.socket.display()
            );
            return Ok(0);
        }
        Ok(Started::Failed { reason, log_start }) => (reason, Some(log_start)),
        Err(e) => (e.to_string(), None),
    };
    eprintln!("thinfs: {}", crate::types::escape(&reason));
    if let Some(start) = log_start {
        for l in run_log(&log_path, start) {
            eprintln!("  {}", crate::types::escape(&l));
        }
    }
    daemon::remove_created(&new_mp, false);
    daemon::remove_created(&new_state, true);
    Ok(1)
}

/// How the daemon started.
enum Started {
    /// Mounted: its pid.
    Ready(u32),
    /// Not mounted: why, and where this run's log begins.
    Failed { reason: String, log_start: u64 },
}

/// Start the daemon with its output appended to `log_path`; wait until it
/// says it is ready or failed.
fn start_child(log_path: &Path) -> Result<Started> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log_path)
        .ctx(|| format!("open {}", log_path.display()))?;
    let log_start = log
        .metadata()
        .ctx(|| format!("stat {}", log_path.display()))?
        .len();
    let (mut rd, wr) = process::ready_pipe().ctx(|| "make a pipe".into())?;
    let exe = std::env::current_exe().ctx(|| "find own executable".into())?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|x| x != "--daemon")
        .collect();
    let wr_num = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let mut child = std::process::Command::new(exe)
        .args(&args)
        .env(READY_ENV, wr_num.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().ctx(|| "dup log".into())?)
        .stderr(log)
        .spawn()
        .ctx(|| "start the daemon".into())?;
    drop(wr);
    let mut first = [0u8; 1];
    if matches!(rd.read(&mut first), Ok(1)) && first == READY {
        return Ok(Started::Ready(child.id()));
    }
    let mut said = Vec::new();
    let _ = (&mut rd).take(MAX_REASON).read_to_end(&mut said);
    let status = child.wait();
    let reason = if first[0] == FAILED.as_bytes()[0] {
        String::from_utf8_lossy(&said).into_owned()
    } else {
        match status {
            Ok(st) => format!("the daemon ended before the mount was ready ({st})"),
            Err(e) => format!("the daemon ended before the mount was ready ({e})"),
        }
    };
    Ok(Started::Failed { reason, log_start })
}

/// The warnings and errors that this run (from byte `start` on) logged,
/// the last [`MAX_LOG_LINES`] of them.
fn run_log(path: &Path, start: u64) -> Vec<String> {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        use std::io::Seek;
        if f.seek(std::io::SeekFrom::Start(start)).is_ok() {
            let _ = f.take(MAX_REASON).read_to_string(&mut text);
        }
    }
    let lines: Vec<String> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_string)
        .collect();
    let skip = lines.len().saturating_sub(MAX_LOG_LINES);
    lines.into_iter().skip(skip).collect()
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
