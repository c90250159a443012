//! Every setting of the config file, honoured by a real daemon started
//! with nothing but `--config` (no flag that would hide a setting the
//! daemon ignores), and the control socket's path as the daemon and the
//! clients resolve it: `--socket` over `$THINFS_SOCKET` over the config
//! file's `socket` over the default; the clients find the config file as
//! the daemon does (`--config`, `$THINFS_CONFIG`).

mod common;

use common::*;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A `thinfs mount` started with the given arguments and environment;
/// stopped (and its mount detached) on drop, even when the test panics.
struct Daemon {
    mnt: PathBuf,
    child: Option<std::process::Child>,
    log: PathBuf,
    scratch: PathBuf,
}

/// A CLI or daemon command with none of the variables that would choose
/// a socket or a config file for it.
fn thinfs() -> Command {
    let mut c = Command::new(thinfs_bin());
    c.env_remove("THINFS_SOCKET").env_remove("THINFS_CONFIG");
    c
}

impl Daemon {
    /// Start `thinfs mount ARGS MNT` with `env`; wait until the mount
    /// answers (or the daemon exits: then `Err` with its log).
    fn try_start(s: &Scratch, args: &[&str], env: &[(&str, &Path)]) -> Result<Daemon, String> {
        let mnt = s.path().join("mnt");
        let log = s.path().join("daemon.log");
        let f = std::fs::File::create(&log).unwrap();
        let mut c = thinfs();
        c.arg("mount").args(args).arg(&mnt);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start thinfs mount");
        let mut d = Daemon {
            mnt,
            child: Some(child),
            log,
            scratch: s.path().to_path_buf(),
        };
        for _ in 0..1200 {
            if std::fs::read(d.mnt.join(".thinfs/pool.json")).is_ok() {
                return Ok(d);
            }
            if let Some(c) = d.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                d.child = None;
                return Err(format!(
                    "{st}: {}",
                    std::fs::read_to_string(&d.log).unwrap()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "mount did not come up: {}",
            std::fs::read_to_string(&d.log).unwrap()
        );
    }

    fn start(s: &Scratch, args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        Self::try_start(s, args, env).unwrap_or_else(|e| panic!("thinfs mount failed: {e}"))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let mut done = false;
            for _ in 0..1200 {
                if let Ok(Some(_)) = c.try_wait() {
                    done = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            if !done {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if mounts.contains(&format!(" {} ", self.mnt.display())) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        wait_no_loops(&self.scratch);
    }
}

/// Test backend name for the config file (`THINFS_TEST_BACKEND`).
fn backend() -> String {
    std::env::var("THINFS_TEST_BACKEND").unwrap_or_else(|_| "reflink".into())
}

/// Write a config file with a scratch state, a scratch socket, a small
/// pool and the test's backend, plus `extra` lines (which override
/// these). Returns (config path, the socket it names).
fn write_config(s: &Scratch, extra: &str) -> (PathBuf, PathBuf) {
    let sock = s.path().join("cfg.sock");
    let mut text = String::new();
    let keys: Vec<&str> = extra
        .lines()
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .collect();
    let base = [
        ("state", format!("{:?}", s.path().join("state"))),
        ("socket", format!("{sock:?}")),
        ("pool_size", "\"4G\"".to_string()),
        ("image_size", "\"1G\"".to_string()),
        ("reserve", "\"64M\"".to_string()),
        ("backend", format!("{:?}", backend())),
    ];
    for (k, v) in base {
        if !keys.contains(&k) {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    text.push_str(extra);
    let cfg = s.path().join("config.toml");
    std::fs::write(&cfg, text).unwrap();
    (cfg, sock)
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `thinfs --config CFG ARGS` (the socket from the config file).
fn cli(cfg: &Path, args: &[&str]) -> Output {
    thinfs()
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

fn json(cfg: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(&cli(cfg, args))).unwrap()
}

fn start_with_config(tag: &str, extra: &str) -> (Scratch, Daemon, PathBuf) {
    let s = Scratch::new(tag);
    let (cfg, _) = write_config(&s, extra);
    let d = Daemon::start(&s, &["--config", cfg.to_str().unwrap()], &[]);
    (s, d, cfg)
}

#[test]
fn root_config_socket_daemon_precedence() {
    let s = Scratch::new("conf-sock-daemon");
    let (cfg, a) = write_config(&s, "");
    let cfg_s = cfg.to_str().unwrap();
    let b = s.path().join("env.sock");
    let c = s.path().join("flag.sock");
    // The config file alone.
    let d = Daemon::start(&s, &["--config", cfg_s], &[]);
    assert!(
        is_socket(&a),
        "no socket at the config's {}; log: {}",
        a.display(),
        std::fs::read_to_string(&d.log).unwrap()
    );
    ok(&thinfs()
        .arg("--socket")
        .arg(&a)
        .arg("pool")
        .output()
        .unwrap());
    drop(d);
    // $THINFS_SOCKET over the file.
    let d = Daemon::start(&s, &["--config", cfg_s], &[("THINFS_SOCKET", &b)]);
    assert!(is_socket(&b), "no socket at $THINFS_SOCKET");
    assert!(!is_socket(&a), "a socket at the config's path too");
    drop(d);
    // --socket over both.
    let d = Daemon::start(
        &s,
        &["--config", cfg_s, "--socket", c.to_str().unwrap()],
        &[("THINFS_SOCKET", &b)],
    );
    assert!(is_socket(&c), "no socket at --socket");
    assert!(!is_socket(&a) && !is_socket(&b));
    drop(d);
    // The same with THINFS_CONFIG instead of --config.
    let d = Daemon::start(&s, &[], &[("THINFS_CONFIG", &cfg)]);
    assert!(is_socket(&a), "THINFS_CONFIG not read by the daemon");
    drop(d);
}

#[test]
fn root_config_socket_clients_precedence() {
    let (s, _d, cfg) = start_with_config("conf-sock-cli", "");
    let nowhere = s.path().join("nowhere.sock");
    // --config (before or after the verb), THINFS_CONFIG.
    ok(&cli(&cfg, &["pool"]));
    ok(&thinfs()
        .args(["list", "--config"])
        .arg(&cfg)
        .output()
        .unwrap());
    ok(&thinfs()
        .arg("pool")
        .env("THINFS_CONFIG", &cfg)
        .output()
        .unwrap());
    // $THINFS_SOCKET over the file: it names the socket that failed.
    let o = thinfs()
        .arg("pool")
        .env("THINFS_CONFIG", &cfg)
        .env("THINFS_SOCKET", &nowhere)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(nowhere.to_str().unwrap()), "{err}");
    // --socket over $THINFS_SOCKET and the file.
    let sock = s.path().join("cfg.sock");
    ok(&thinfs()
        .arg("pool")
        .arg("--socket")
        .arg(&sock)
        .env("THINFS_CONFIG", &cfg)
        .env("THINFS_SOCKET", &nowhere)
        .output()
        .unwrap());
    let o = cli(&cfg, &["pool", "--socket", nowhere.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    // A missing --config is an error for a verb that needs the socket,
    // none for one that does not, nor when --socket is given.
    let missing = s.path().join("missing.toml");
    let o = cli(&missing, &["pool"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing.toml"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(&cli(&missing, &["man"]));
    ok(&cli(
        &missing,
        &["pool", "--socket", sock.to_str().unwrap()],
    ));
    // No flag, no variable, no config file: the default path.
    if !Path::new("/etc/thinfs/config.toml").exists()
        && !Path::new("/run/thinfs/thinfs.sock").exists()
    {
        let o = thinfs().arg("pool").output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("/run/thinfs/thinfs.sock"), "{err}");
    }
}

#[test]
fn root_config_state() {
    let s = Scratch::new("conf-state");
    let state = s.path().join("elsewhere");
    let (cfg, _) = write_config(&s, &format!("state = {state:?}\n"));
    let _d = Daemon::start(&s, &["--config", cfg.to_str().unwrap()], &[]);
    let n = std::fs::read_dir(&state)
        .unwrap_or_else(|e| panic!("{}: {e}", state.display()))
        .count();
    assert!(n > 0, "the configured state directory is empty");
    assert!(!s.path().join("state").exists());
}

#[test]
fn root_config_backend() {
    let (_s, _d, cfg) = start_with_config("conf-backend", "");
    assert_eq!(json(&cfg, &["pool", "--json"])["backend"], backend());
    // A bad value is refused, naming it: the file is read.
    let s = Scratch::new("conf-backend-bad");
    let (cfg, _) = write_config(&s, "backend = \"nonsense\"\n");
    let e = Daemon::try_start(&s, &["--config", cfg.to_str().unwrap()], &[])
        .err()
        .expect("a daemon with backend = nonsense");
    assert!(e.contains("nonsense"), "{e}");
}

#[test]
fn root_config_pool_size() {
    let (_s, _d, cfg) = start_with_config("conf-pool", "pool_size = \"3G\"\n");
    let total = json(&cfg, &["pool", "--json"])["total"].as_u64().unwrap();
    assert!(
        total <= 3 << 30 && total > 2 << 30,
        "pool of {total} bytes, 3G configured"
    );
}

#[test]
fn root_config_reserve() {
    let (_s, _d, cfg) = start_with_config("conf-reserve", "reserve = \"300M\"\n");
    assert_eq!(json(&cfg, &["pool", "--json"])["reserve"], 300u64 << 20);
}

#[test]
fn root_config_image_size() {
    let (s, d, cfg) = start_with_config("conf-imgsize", "image_size = \"2G\"\n");
    ok(&cli(&cfg, &["create", "a"]));
    std::fs::create_dir(d.mnt.join("b")).unwrap();
    for n in ["a", "b"] {
        assert_eq!(
            json(&cfg, &["info", n, "--json"])["size"],
            2u64 << 30,
            "{n}"
        );
    }
    drop(d);
    // A flag overrides the file.
    let d = Daemon::start(
        &s,
        &["--config", cfg.to_str().unwrap(), "--image-size", "3G"],
        &[],
    );
    ok(&cli(&cfg, &["create", "c"]));
    assert_eq!(json(&cfg, &["info", "c", "--json"])["size"], 3u64 << 30);
    drop(d);
}

#[test]
fn root_config_admin_group() {
    const GID: u32 = 47123;
    let (s, _d, cfg) = start_with_config("conf-admin", &format!("admin_group = \"{GID}\"\n"));
    let copy = s.path().join("thinfs-cli");
    std::fs::copy(thinfs_bin(), &copy).unwrap();
    let cmd = format!(
        "{} --socket {} create by-member",
        copy.display(),
        s.path().join("cfg.sock").display()
    );
    let (good, out) = as_user(47124, 47124, &[GID], &cmd);
    assert!(good, "a member of the configured admin group: {out}");
    let (good, out) = as_user(47124, 47124, &[], &cmd.replace("by-member", "by-other"));
    assert!(!good && out.contains("permission denied"), "{out}");
    drop(cfg);
}

#[test]
fn root_config_show_hidden() {
    let (_s, d, cfg) = start_with_config("conf-hidden", "show_hidden = true\n");
    ok(&cli(&cfg, &["create", "a"]));
    let names: Vec<String> = std::fs::read_dir(d.mnt.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n == ".snapshots"), "{names:?}");
}

#[test]
fn root_config_idle_secs() {
    let (_s, d, cfg) = start_with_config("conf-idle", "idle_secs = 1\n");
    ok(&cli(&cfg, &["create", "a"]));
    std::fs::write(d.mnt.join("a/f"), b"x").unwrap();
    let mounted = || json(&cfg, &["info", "a", "--json"])["mounted"] == true;
    assert!(mounted(), "image a not mounted after a write");
    // Unmounted after about a second idle (5 minutes by default).
    let t = std::time::Instant::now();
    while mounted() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "still mounted after 30 s with idle_secs = 1"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn root_config_threads() {
    let (_s, d, cfg) = start_with_config("conf-threads", "threads = 2\n");
    let workers = || {
        std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm)
                    .unwrap_or_default()
                    .starts_with("fuser-")
            })
            .count()
    };
    // fuser starts its workers one after another once the mount is made.
    let t = std::time::Instant::now();
    while workers() < 2 && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ok(&cli(&cfg, &["pool"]));
    std::fs::read_dir(&d.mnt).unwrap().for_each(drop);
    assert_eq!(workers(), 2, "FUSE worker threads (fuser-N), 4 by default");
}

#[test]
fn root_config_containerd_socket() {
    let s = Scratch::new("conf-ctd");
    let ctd = s.path().join("ctd.sock");
    let (cfg, _) = write_config(&s, &format!("containerd_socket = {ctd:?}\n"));
    let _d = Daemon::start(&s, &["--config", cfg.to_str().unwrap()], &[]);
    assert!(is_socket(&ctd), "no containerd socket at {}", ctd.display());
}

#[test]
fn root_config_allow_suid_dev() {
    let (_s, d, _cfg) = start_with_config("conf-suid", "allow_suid_dev = true\n");
    let table = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(d.mnt.to_str().unwrap()))
        .expect("the mount in /proc/mounts");
    let opts = line.split_whitespace().nth(3).unwrap();
    assert!(!opts.split(',').any(|o| o == "nosuid"), "{opts}");
}
