//! `thinfs mount` and `thinfs umount`.

use crate::daemon::{self, MountConfig};
use crate::engine::{BackendChoice, PoolOptions};
use crate::error::{Error, IoContext, Result};
use crate::fuse::FuseOptions;
use crate::sys::{mount, process};
use crate::types::Bytes;
use clap::Args;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const READY_ENV: &str = "THINFS_READY_FD";

/// Arguments of `thinfs mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// State directory (metadata and pool).
    #[arg(long, default_value = "/var/lib/thinfs")]
    state: PathBuf,
    /// Block backend.
    #[arg(long, default_value = "auto", value_parser = ["auto", "reflink", "dm"])]
    backend: String,
    /// Size of a new pool (e.g. 64G); an existing pool keeps its size.
    #[arg(long, default_value = "64G")]
    pool_size: String,
    /// Free space below which new images and snapshots are refused (default 5% of the pool).
    #[arg(long)]
    reserve: Option<String>,
    /// Size of images made by mkdir.
    #[arg(long, default_value = "10G")]
    image_size: String,
    /// Show .snapshots and lost+found in directory listings.
    #[arg(long)]
    show_hidden: bool,
    /// Unmount inner filesystems idle this many seconds.
    #[arg(long, default_value_t = 300)]
    idle_secs: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Detach once the mount is ready (log goes to STATE/thinfs.log).
    #[arg(long)]
    daemon: bool,
    /// Where to mount.
    mountpoint: PathBuf,
}

fn config(a: &MountArgs) -> Result<MountConfig> {
    let mut pool = PoolOptions::new(&a.state);
    pool.backend = a.backend.parse::<BackendChoice>()?;
    pool.pool_size = Bytes::parse(&a.pool_size)?;
    pool.reserve = a.reserve.as_deref().map(Bytes::parse).transpose()?;
    pool.default_image_size = Bytes::parse(&a.image_size)?;
    Ok(MountConfig {
        pool,
        mountpoint: a.mountpoint.clone(),
        fuse: FuseOptions {
            show_hidden: a.show_hidden,
            ..FuseOptions::default()
        },
        idle: Duration::from_secs(a.idle_secs),
        threads: a.threads,
    })
}

fn init_log() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

/// `thinfs mount`.
pub fn mount(a: MountArgs) -> Result<()> {
    let cfg = config(&a)?;
    if process::euid() != 0 {
        return Err(Error::PermissionDenied(
            "thinfs mount needs root (loop devices, mounts, /dev/fuse)".into(),
        ));
    }
    if a.daemon {
        return spawn_daemon(&a);
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
fn spawn_daemon(a: &MountArgs) -> Result<()> {
    std::fs::create_dir_all(&a.state).ctx(|| format!("create {}", a.state.display()))?;
    let log_path = a.state.join("thinfs.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
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
                "thinfs mounted at {} (pid {}, log {})",
                a.mountpoint.display(),
                child.id(),
                log_path.display()
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
