//! Opening a pool: state directory, lock, metadata, backend choice.

use super::{Engine, EngineConfig};
use crate::backend::Backend;
use crate::backend::dm::DmPool;
use crate::backend::reflink::ReflinkPool;
use crate::error::{Error, IoContext, Result};
use crate::meta::{Meta, PoolRecord, SCHEMA_VERSION};
use crate::sys;
use crate::types::Bytes;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// dm-thin when the kernel has it, reflink otherwise.
    Auto,
    /// The embedded reflink pool.
    Reflink,
    /// Linux dm-thin.
    Dm,
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "reflink" => Ok(BackendChoice::Reflink),
            "dm" => Ok(BackendChoice::Dm),
            _ => Err(Error::Invalid(format!(
                "unknown backend {s:?} (auto, reflink, dm)"
            ))),
        }
    }
}

/// How to open or create a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// State directory (sled metadata, pool file).
    pub state: PathBuf,
    /// Backend choice.
    pub backend: BackendChoice,
    /// Size of a new pool.
    pub pool_size: Bytes,
    /// Reserve; default 5% of the pool, at least 256M.
    pub reserve: Option<Bytes>,
    /// Default image size.
    pub default_image_size: Bytes,
}

impl PoolOptions {
    /// Defaults for a state directory.
    pub fn new(state: impl Into<PathBuf>) -> PoolOptions {
        PoolOptions {
            state: state.into(),
            backend: BackendChoice::Auto,
            pool_size: Bytes(64 << 30),
            reserve: None,
            default_image_size: Bytes(10 << 30),
        }
    }
}

/// How long opening a pool waits for the state directory's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Engine {
    /// Open the pool in `opts.state`, creating it if needed, and recover it.
    /// Takes an exclusive lock on the state directory for the engine's life.
    pub fn open_pool(opts: &PoolOptions) -> Result<Engine> {
        std::fs::create_dir_all(&opts.state)
            .ctx(|| format!("create state directory {}", opts.state.display()))?;
        std::fs::set_permissions(&opts.state, std::fs::Permissions::from_mode(0o700))
            .ctx(|| format!("restrict {}", opts.state.display()))?;
        let lock_path = opts.state.join("lock");
        let lock = File::create(&lock_path).ctx(|| format!("create {}", lock_path.display()))?;
        // A lock held for a moment only is waited for: a daemon that has
        // just exited, or a copy of its descriptor in a process forked by
        // another thread of the same program that has not reached exec yet
        // (close-on-exec drops it there; seen in the crash tests under load).
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match sys::file::flock(lock.as_fd(), libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EWOULDBLOCK)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(Error::Busy(format!(
                        "state directory {} is in use by another thinfs ({e})",
                        opts.state.display()
                    )));
                }
            }
        }
        let meta = Meta::open(&opts.state.join("meta"))?;
        let existing = meta.pool()?;
        if let Some(p) = &existing
            && p.schema > SCHEMA_VERSION
        {
            return Err(Error::Invalid(format!(
                "pool schema {} is newer than this thinfs understands ({SCHEMA_VERSION})",
                p.schema
            )));
        }
        let kind = match (&existing, opts.backend) {
            (Some(p), BackendChoice::Auto) => p.backend.clone(),
            (Some(p), BackendChoice::Reflink) if p.backend != "reflink" => {
                return Err(Error::Invalid(format!(
                    "the pool in {} is a {} pool",
                    opts.state.display(),
                    p.backend
                )));
            }
            (Some(p), BackendChoice::Dm) if p.backend != "dm" => {
                return Err(Error::Invalid(format!(
                    "the pool in {} is a {} pool",
                    opts.state.display(),
                    p.backend
                )));
            }
            (Some(p), _) => p.backend.clone(),
            (None, BackendChoice::Dm) => "dm".to_string(),
            (None, BackendChoice::Reflink) => "reflink".to_string(),
            (None, BackendChoice::Auto) => match crate::backend::dm::available() {
                Ok(()) => {
                    log::info!("backend auto: dm-thin is available, using it");
                    "dm".to_string()
                }
                Err(why) => {
                    log::info!("backend auto: {why}; using the embedded reflink pool");
                    "reflink".to_string()
                }
            },
        };
        let size = existing.as_ref().map(|p| p.size).unwrap_or(opts.pool_size);
        let backend: Arc<dyn Backend> = match kind.as_str() {
            "reflink" => Arc::new(ReflinkPool::open(&opts.state, size)?),
            "dm" => Arc::new(DmPool::open(&opts.state, size)?),
            other => {
                return Err(Error::Invalid(format!(
                    "unknown backend {other:?} in pool record"
                )));
            }
        };
        let total = backend.status()?.total;
        let reserve = opts
            .reserve
            .or(existing.as_ref().map(|p| p.reserve))
            .unwrap_or(Bytes((total / 20).max(256 << 20).min(total / 4)));
        let rec = PoolRecord {
            schema: SCHEMA_VERSION,
            backend: kind,
            size,
            reserve,
            default_image_size: opts.default_image_size,
            transaction_id: existing.as_ref().map(|p| p.transaction_id).unwrap_or(0),
        };
        meta.set_pool(&rec)?;
        let mut e = Engine::open(
            meta,
            backend,
            EngineConfig {
                default_image_size: opts.default_image_size,
                reserve,
            },
        )?;
        e.lock_file = Some(lock);
        Ok(e)
    }
}
