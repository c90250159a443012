//! The `thinfs` command line: argument parsing, exit codes (0 ok,
//! 1 operation failed, 2 usage) and human output. `mount` runs the daemon
//! in this process; the other verbs talk to a running daemon over its
//! control socket.

mod backup;
mod client;
mod config;
mod export;
mod import;
mod mount;
mod output;
mod progress;
mod send;
mod show;

use crate::daemon::proto::Op;
use crate::error::Result;
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

/// Copy-on-write snapshot filesystem: images and snapshots as directories.
#[derive(Debug, Parser)]
#[command(name = "thinfs", version, about, propagate_version = true)]
pub struct Cli {
    /// Control socket of the daemon [default: $THINFS_SOCKET, else `socket`
    /// in the config file, else /run/thinfs/thinfs.sock]
    #[arg(long, global = true, env = "THINFS_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TOML config file [default: $THINFS_CONFIG, else
    /// /etc/thinfs/config.toml if present]
    #[arg(long, global = true, env = "THINFS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Mount thinfs (foreground unless --daemon), creating the pool if needed
    Mount(Box<mount::MountArgs>),
    /// Unmount thinfs at MOUNTPOINT (also cleans a mount whose daemon died)
    Umount {
        /// The mount point
        mountpoint: PathBuf,
    },
    /// Create an empty image
    Create {
        /// Image name
        #[arg(value_parser = name_arg)]
        name: String,
        /// Virtual size (e.g. 10G) [default: the mount's --image-size]
        #[arg(long, value_parser = size_arg)]
        size: Option<String>,
    },
    /// Take a snapshot: NAME@SNAP
    Snapshot {
        /// NAME@SNAP
        #[arg(value_parser = snap_arg)]
        target: String,
    },
    /// Make a writable image NEW from snapshot NAME@SNAP
    Clone {
        /// NAME@SNAP
        #[arg(value_parser = snap_arg)]
        source: String,
        /// New image name
        #[arg(value_parser = name_arg)]
        new: String,
    },
    /// Put image NAME back to snapshot NAME@SNAP
    Rollback {
        /// NAME@SNAP
        #[arg(value_parser = snap_arg)]
        target: String,
        /// Destroy snapshots newer than SNAP (refused otherwise)
        #[arg(long)]
        destroy_newer: bool,
    },
    /// Destroy an image (with -r: and its snapshots) or a snapshot
    Destroy {
        /// NAME or NAME@SNAP
        #[arg(value_parser = target_arg)]
        target: String,
        /// Also destroy the image's snapshots
        #[arg(short = 'r', long)]
        recursive: bool,
    },
    /// Rename an image (OLD NEW) or a snapshot (NAME@OLD NAME@NEW or NAME@OLD NEW)
    Rename {
        /// NAME or NAME@SNAP
        #[arg(value_parser = target_arg)]
        old: String,
        /// New name
        #[arg(value_parser = target_arg)]
        new: String,
    },
    /// Grow an image (online)
    Resize {
        /// Image name
        #[arg(value_parser = name_arg)]
        name: String,
        /// New size (e.g. 20G)
        #[arg(value_parser = size_arg)]
        size: String,
    },
    /// Check and repair an image's filesystem (e2fsck; unmounts it first)
    Fsck {
        /// NAME or NAME@SNAP
        #[arg(value_parser = target_arg)]
        target: String,
    },
    /// Set (KEY=VALUE) or remove (KEY) a label
    Label {
        /// NAME or NAME@SNAP
        #[arg(value_parser = target_arg)]
        target: String,
        /// KEY=VALUE to set, KEY to remove
        label: String,
    },
    /// Write a tarball of an image's or snapshot's files (root or admin group)
    Export {
        /// NAME (exported from a temporary snapshot) or NAME@SNAP
        #[arg(value_parser = target_arg)]
        target: String,
        /// Output file, created as the calling user (never through a symbolic link); `-` or none: stdout (never a terminal)
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Replace an existing regular file at the output path
        #[arg(long)]
        force: bool,
        /// Compress with zstd (implied by an output name ending in .zst)
        #[arg(long)]
        zstd: bool,
        /// No progress bar and no summary
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Write a snapshot stream to stdout (root or admin group; never to a terminal)
    Send {
        /// NAME@SNAP to send (none with -t)
        #[arg(required_unless_present = "token", value_parser = snap_arg)]
        target: Option<String>,
        /// The rest of an interrupted stream: the receiver's resume token
        /// (`thinfs info NAME --json`, receive_resume_token)
        #[arg(short = 't', value_name = "TOKEN", conflicts_with_all = ["incremental", "haves"])]
        token: Option<String>,
        /// Send only the difference from this older snapshot of the image
        #[arg(short = 'i', value_name = "SNAP", conflicts_with = "haves")]
        incremental: Option<String>,
        /// The receiver's `thinfs haves NAME --json` output (`-` for stdin):
        /// the newest snapshot it has becomes the base
        #[arg(long, value_name = "FILE")]
        haves: Option<PathBuf>,
        /// Compress the stream
        #[arg(long)]
        compress: bool,
        /// No progress bar and no summary
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Read a snapshot stream from stdin into image NAME (root only)
    Receive {
        /// The image to create (full stream) or to add the snapshot to
        #[arg(value_parser = name_arg)]
        name: String,
        /// Discard changes made to NAME since its newest snapshot first (never destroys a snapshot)
        #[arg(short = 'F')]
        force: bool,
        /// Keep the partial state of an interrupted receive, to resume it
        #[arg(short = 's')]
        keep_partial: bool,
        /// Abandon the partial receive of NAME (reads no stream)
        #[arg(short = 'A', conflicts_with_all = ["keep_partial", "force"])]
        abandon: bool,
        /// No progress bar and no summary
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// An image's snapshots with their identities, for `send --haves` (any user)
    Haves {
        /// Image name
        #[arg(value_parser = name_arg)]
        name: String,
        /// JSON output (the input of `send --haves FILE`)
        #[arg(long)]
        json: bool,
    },
    /// List images and snapshots (any user)
    List {
        /// Which devices
        #[arg(short = 't', long = "type", default_value = "all", value_parser = ["image", "snapshot", "containerd", "all"])]
        kind: String,
        /// Columns, comma-separated (name,type,state,size,used,exclusive,parent,id,created,mounted,labels,error)
        #[arg(short = 'o', default_value = "name,type,state,size,used,parent", value_parser = fields_arg)]
        fields: String,
        /// No header line
        #[arg(short = 'H')]
        no_header: bool,
        /// JSON output (stable, see README)
        #[arg(long)]
        json: bool,
    },
    /// Show the parent/child graph (any user)
    Tree {
        /// Graphviz output
        #[arg(long)]
        dot: bool,
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// Everything about one image or snapshot (any user)
    Info {
        /// NAME or NAME@SNAP
        #[arg(value_parser = target_arg)]
        target: String,
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// Exclusive and shared space per device (any user)
    Usage {
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// Pool status (any user)
    Pool {
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff)
    Man,
    /// New image from a directory or a tarball (.tar, .tar.gz; `-`: stdin), ending with snapshot NAME@import (root)
    Import {
        /// New image name
        #[arg(value_parser = name_arg)]
        name: String,
        /// Directory (walked with your read rights), tarball, or `-` for stdin
        source: PathBuf,
        /// Image size (10G); default: sized to fit the content
        #[arg(short = 's', long, value_parser = size_arg)]
        size: Option<String>,
        /// No progress bar and no summary
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Write a backup file of an image (root or admin group); `backup verify FILE` checks one without a pool
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Backup {
        #[command(subcommand)]
        action: Option<BackupAction>,
        /// Image name
        #[arg(required = true, value_parser = name_arg)]
        name: Option<String>,
        /// Every snapshot too (oldest full, the others incremental), not only the head
        #[arg(long)]
        snapshots: bool,
        /// Output file, created as the calling user (never through a symbolic link)
        #[arg(short = 'o', long = "output", required = true)]
        output: Option<PathBuf>,
        /// Replace an existing regular file at the output path
        #[arg(long)]
        force: bool,
        /// No progress bar and no summary
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Restore a backup file as a new image, all or nothing (root)
    Restore {
        /// The backup file
        file: PathBuf,
        /// Image name (default: the name in the backup)
        #[arg(value_parser = name_arg)]
        name: Option<String>,
        /// No progress bar and no summary
        #[arg(short = 'q', long)]
        quiet: bool,
    },
}

/// A size argument (`10G`), checked when the arguments are parsed: a bad
/// one is a usage mistake (exit 2). Kept as written, for the daemon.
pub(crate) fn size_arg(s: &str) -> std::result::Result<String, String> {
    crate::types::Bytes::parse(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `NAME` or `NAME@SNAP`, with the rules of every name (exit 2
/// otherwise; the daemon applies those of new names).
fn target_arg(s: &str) -> std::result::Result<String, String> {
    crate::engine::Target::parse(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `NAME@SNAP` (exit 2 otherwise).
fn snap_arg(s: &str) -> std::result::Result<String, String> {
    match crate::engine::Target::parse(s) {
        Ok(t) if t.snap.is_some() => Ok(s.to_string()),
        Ok(_) => Err(format!("{s:?} is not NAME@SNAP")),
        Err(e) => Err(e.to_string()),
    }
}

/// An image's `NAME` (exit 2 otherwise).
fn name_arg(s: &str) -> std::result::Result<String, String> {
    crate::types::Name::new(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `list -o`: every field known (exit 2 otherwise).
fn fields_arg(s: &str) -> std::result::Result<String, String> {
    match s
        .split(',')
        .map(str::trim)
        .find(|f| !show::FIELDS.contains(f))
    {
        Some(f) => Err(format!(
            "unknown field {f:?} (fields: {})",
            show::FIELDS.join(",")
        )),
        None => Ok(s.to_string()),
    }
}

/// `thinfs backup verify`.
#[derive(clap::Subcommand, Debug)]
pub enum BackupAction {
    /// Check every checksum of a backup file (no daemon, no pool); says where damage is
    Verify {
        /// The backup file
        file: PathBuf,
        /// No progress bar
        #[arg(short = 'q', long)]
        quiet: bool,
    },
}

fn print(
    v: serde_json::Value,
    json: bool,
    human: impl FnOnce(serde_json::Value) -> Result<String>,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", human(v)?);
    }
    Ok(())
}

/// Run the verb; the exit code when it did not fail with an error.
fn run(cli: Cli) -> Result<i32> {
    let (flag, file) = (cli.socket.as_deref(), cli.config.as_deref());
    // Resolved only by the verbs that talk to the daemon: `man` or
    // `backup verify` work whatever the config file says.
    let sock = || config::socket(flag, file);
    let call = |op| client::call(&sock()?, op);
    match cli.cmd {
        Cmd::Mount(a) => return mount::mount(*a, flag, file),
        Cmd::Umount { mountpoint } => mount::umount(&mountpoint),
        Cmd::Create { name, size } => {
            call(Op::Create {
                name: name.clone(),
                size,
            })?;
            println!("created image {name}");
            Ok(())
        }
        Cmd::Snapshot { target } => {
            call(Op::Snapshot {
                target: target.clone(),
            })?;
            println!("snapshot {target} taken");
            Ok(())
        }
        Cmd::Clone { source, new } => {
            call(Op::Clone {
                source: source.clone(),
                name: new.clone(),
            })?;
            println!("cloned {source} to image {new}");
            Ok(())
        }
        Cmd::Rollback {
            target,
            destroy_newer,
        } => {
            call(Op::Rollback {
                target: target.clone(),
                destroy_newer,
            })?;
            println!("rolled back to {target}");
            Ok(())
        }
        Cmd::Destroy { target, recursive } => {
            call(Op::Destroy {
                target: target.clone(),
                recursive,
            })?;
            println!("destroyed {target}");
            Ok(())
        }
        Cmd::Rename { old, new } => {
            call(Op::Rename {
                from: old.clone(),
                to: new.clone(),
            })?;
            println!("renamed {old} to {new}");
            Ok(())
        }
        Cmd::Resize { name, size } => {
            call(Op::Resize {
                name: name.clone(),
                size: size.clone(),
            })?;
            println!("resized {name} to {size}");
            Ok(())
        }
        Cmd::Fsck { target } => {
            let v = call(Op::Fsck {
                target: target.clone(),
            })?;
            print!("{}", v["output"].as_str().unwrap_or(""));
            match v["exit"].as_i64() {
                Some(0) => println!("{target}: clean"),
                _ => println!("{target}: errors were repaired"),
            }
            Ok(())
        }
        Cmd::Label { target, label } => {
            let (key, value) = match label.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (label.clone(), None),
            };
            call(Op::Label { target, key, value })?;
            Ok(())
        }
        Cmd::Export {
            target,
            output,
            force,
            zstd,
            quiet,
        } => export::export(&sock()?, target, output, force, zstd, quiet),
        Cmd::Send {
            target,
            token,
            incremental,
            haves,
            compress,
            quiet,
        } => send::send(
            &sock()?,
            send::SendArgs {
                target: target.unwrap_or_default(),
                token,
                incremental,
                haves,
                compress,
                quiet,
            },
        ),
        Cmd::Receive {
            name,
            force,
            keep_partial,
            abandon,
            quiet,
        } => send::receive(
            &sock()?,
            crate::service::ReceiveRequest {
                name,
                force_rollback: force,
                keep_partial,
                abandon,
            },
            quiet,
        ),
        Cmd::Haves { name, json } => {
            print(call(Op::Haves { image: name })?, json, send::haves_text)
        }
        Cmd::List {
            kind,
            fields,
            no_header,
            json,
        } => {
            let fields: Vec<String> = fields.split(',').map(|s| s.trim().to_string()).collect();
            let partials = call(Op::Partials)?;
            let extra = show::partial_rows(&partials, &kind, &fields);
            print(call(Op::List { kind })?, json, |v| {
                show::list_with(v, &fields, !no_header, extra)
            })
        }
        Cmd::Tree { dot, json } => print(call(Op::Tree)?, json, |v| show::tree(v, dot)),
        Cmd::Info { target, json } => {
            let partials = call(Op::Partials)?;
            let v = show::with_partial(
                call(Op::Info {
                    target: target.clone(),
                }),
                &partials,
                &target,
            )?;
            print(v, json, show::info)
        }
        Cmd::Usage { json } => print(call(Op::Usage)?, json, show::usage),
        Cmd::Pool { json } => print(call(Op::Pool)?, json, show::pool),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "thinfs", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|e| crate::error::Error::io("write man page", e)),
        Cmd::Import {
            name,
            source,
            size,
            quiet,
        } => import::import(&sock()?, name, source, size, quiet),
        Cmd::Backup {
            action: Some(BackupAction::Verify { file, quiet }),
            ..
        } => backup::verify(file, quiet),
        Cmd::Backup {
            action: None,
            name,
            snapshots,
            output,
            force,
            quiet,
        } => match (name, output) {
            (Some(n), Some(o)) => backup::backup(&sock()?, n, snapshots, o, force, quiet),
            _ => Err(crate::error::Error::Invalid(
                "usage: thinfs backup NAME [--snapshots] -o FILE, or thinfs backup verify FILE"
                    .into(),
            )),
        },
        Cmd::Restore { file, name, quiet } => backup::restore(&sock()?, file, name, quiet),
    }
    .map(|()| 0)
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
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Messages may quote names that other users chose.
            eprintln!("thinfs: {}", crate::types::escape(&e.to_string()));
            1
        }
    }
}
