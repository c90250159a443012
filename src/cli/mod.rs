//! The `thinfs` command line: argument parsing, exit codes (0 ok,
//! 1 operation failed, 2 usage) and human output. `mount` runs the daemon
//! in this process; the other verbs talk to a running daemon.

mod mount;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Copy-on-write snapshot filesystem: images and snapshots as directories.
#[derive(Debug, Parser)]
#[command(name = "thinfs", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Mount thinfs (foreground unless --daemon), creating the pool if needed.
    Mount(mount::MountArgs),
    /// Unmount thinfs at MOUNTPOINT (also cleans a mount whose daemon died).
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
}

/// Parse arguments, run, and return the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let r = match cli.cmd {
        Cmd::Mount(a) => mount::mount(a),
        Cmd::Umount { mountpoint } => mount::umount(&mountpoint),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("thinfs: {e}");
            1
        }
    }
}
