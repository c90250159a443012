//! The config file (TOML) and where the CLI finds it, and the control
//! socket's path as the daemon and every client resolve it the same way:
//! `--socket`, else `$THINFS_SOCKET`, else `socket` in the config file,
//! else [`DEFAULT_SOCKET`]. The config file is `--config`, else
//! `$THINFS_CONFIG`, else [`DEFAULT_CONFIG`] if it exists.

use crate::daemon::proto::DEFAULT_SOCKET;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Config file read when neither `--config` nor `$THINFS_CONFIG` is given,
/// if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/thinfs/config.toml";

/// The config file: the same settings as the flags of `thinfs mount`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state: Option<PathBuf>,
    pub backend: Option<String>,
    pub pool_size: Option<String>,
    pub reserve: Option<String>,
    pub image_size: Option<String>,
    pub show_hidden: Option<bool>,
    pub idle_secs: Option<u64>,
    pub admin_group: Option<String>,
    pub socket: Option<PathBuf>,
    pub threads: Option<usize>,
    pub containerd_socket: Option<PathBuf>,
    pub allow_suid_dev: Option<bool>,
}

/// Read the config file: `path` (from `--config` or `$THINFS_CONFIG`)
/// must exist; without it, [`DEFAULT_CONFIG`] is read if it exists.
pub fn load(path: Option<&Path>) -> Result<FileConfig> {
    let (p, must) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if !must && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileConfig::default());
        }
        Err(e) => return Err(Error::io(format!("read config {}", p.display()), e)),
    };
    toml::from_str(&text).map_err(|e| Error::Invalid(format!("config {}: {e}", p.display())))
}

/// The control socket: `flag` (`--socket`, or `$THINFS_SOCKET` when the
/// flag is absent), else the config file's, else the default. The file is
/// read only when neither is given.
pub fn socket(flag: Option<&Path>, config: Option<&Path>) -> Result<PathBuf> {
    if let Some(s) = flag {
        return Ok(s.to_path_buf());
    }
    Ok(socket_or_default(flag, &load(config)?))
}

/// [`socket`] with the config file already read.
pub fn socket_or_default(flag: Option<&Path>, f: &FileConfig) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| f.socket.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}
