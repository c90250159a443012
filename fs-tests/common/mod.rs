//! Helpers for root tests: a scratch state directory with a marker suffix,
//! a pool opened on it, and cleanup that runs even when the test panics.
#![allow(dead_code)]

pub mod stream;
pub mod tree;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use thinfs::engine::{Engine, PoolOptions};
use thinfs::sys::file;
use thinfs::types::Bytes;

/// Marker in the name of every test object, so a pre-clean can find them.
pub const MARKER: &str = "thinfs-test";

/// Root for scratch directories (on the host filesystem).
pub fn scratch_root() -> PathBuf {
    PathBuf::from(std::env::var("THINFS_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
}

/// Remove leftovers of a crashed earlier run: scratch directories whose
/// owning process is gone. Loop devices and inner mounts need no sweep:
/// they are autoclear/detached and died with their process.
pub fn preclean() {
    let Ok(rd) = std::fs::read_dir(scratch_root()) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&format!("{MARKER}-")) else {
            continue;
        };
        let pid: u32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        preclean();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = scratch_root().join(format!("{MARKER}-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Are the tests running on dm-thin (`THINFS_TEST_BACKEND=dm`)?
pub fn on_dm() -> bool {
    std::env::var("THINFS_TEST_BACKEND").as_deref() == Ok("dm")
}

/// Pool options for tests: a small pool, on the backend named by
/// `THINFS_TEST_BACKEND` (`reflink` by default; `scripts/dm-test` sets `dm`).
pub fn opts(state: &Path) -> PoolOptions {
    let mut o = PoolOptions::new(state.join("state"));
    o.backend = std::env::var("THINFS_TEST_BACKEND")
        .unwrap_or_else(|_| "reflink".into())
        .parse()
        .expect("THINFS_TEST_BACKEND: reflink or dm");
    o.pool_size = Bytes(8 << 30);
    o.reserve = Some(Bytes(128 << 20));
    o.default_image_size = Bytes(1 << 30);
    o
}

pub fn open(state: &Path) -> Engine {
    Engine::open_pool(&opts(state)).expect("open pool")
}

/// Write `data` to `name` under a directory fd, fsync it.
pub fn write_file(dir: BorrowedFd<'_>, name: &str, data: &[u8]) {
    let fd = file::openat(
        dir,
        name.as_ref(),
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        0o644,
    )
    .expect("create file");
    let mut f = File::from(fd);
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

/// Read `name` under a directory fd.
pub fn read_file(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<Vec<u8>> {
    let fd = file::openat(dir, name.as_ref(), libc::O_RDONLY, 0)?;
    let mut v = Vec::new();
    File::from(fd).read_to_end(&mut v)?;
    Ok(v)
}

/// Pseudo-random bytes (xorshift), reproducible from `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Loop devices whose backing file lies under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    thinfs::sys::loopdev::backing_files()
        .into_iter()
        .filter(|(_, b)| b.starts_with(&d))
        .map(|(l, b)| format!("{} -> {b}", l.display()))
        .collect()
}

/// Wait (up to [`HANG`]) until no loop device is backed by files under
/// `dir` (autoclear detaches a loop device a moment after its last close).
pub fn wait_no_loops(dir: &Path) -> Vec<String> {
    let t = std::time::Instant::now();
    while t.elapsed() < HANG {
        let l = loops_under(dir);
        if l.is_empty() {
            return l;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    loops_under(dir)
}

/// How long a test waits for an event before it calls it a hang. Only a
/// hang should reach it: CI may share its 2 cores with another heavy job,
/// and a test that waits less for something that does happen fails there.
pub const HANG: std::time::Duration = std::time::Duration::from_secs(240);

/// Poll `cond` until it holds; panic with `what()` if it does not within
/// [`HANG`].
pub fn wait_event(what: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed() < HANG, "waited {HANG:?} for: {}", what());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A running `thinfs mount` daemon on a scratch mount point, stopped (and
/// its mount removed) on drop, even when the test panics.
pub struct TestMount {
    pub scratch: Scratch,
    pub mnt: PathBuf,
    pub state: PathBuf,
    child: Option<std::process::Child>,
    extra: Vec<String>,
    /// Command that runs the daemon (e.g. `prlimit --nofile=1024:65536`);
    /// it must exec the daemon (same pid). Empty: run it directly.
    pub wrapper: Vec<String>,
}

pub fn thinfs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_thinfs"))
}

impl TestMount {
    pub fn start(tag: &str) -> TestMount {
        Self::start_with(tag, &[])
    }

    pub fn start_with(tag: &str, extra: &[&str]) -> TestMount {
        Self::start_wrapped(tag, &[], extra)
    }

    /// Start the daemon through `wrapper` (a command that execs it).
    pub fn start_wrapped(tag: &str, wrapper: &[&str], extra: &[&str]) -> TestMount {
        let scratch = Scratch::new(tag);
        let mnt = scratch.path().join("mnt");
        let state = scratch.path().join("state");
        let mut m = TestMount {
            scratch,
            mnt,
            state,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        m.spawn();
        m
    }

    pub fn log_path(&self) -> PathBuf {
        self.scratch.path().join("daemon.log")
    }

    /// Start the daemon (again) and wait for the mount to answer.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = match self.wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = std::process::Command::new(w);
                c.args(rest).arg(thinfs_bin());
                c
            }
            None => std::process::Command::new(thinfs_bin()),
        };
        let child = cmd
            .arg("mount")
            .arg("--state")
            .arg(&self.state)
            .args([
                "--pool-size",
                "8G",
                "--image-size",
                "1G",
                "--reserve",
                "64M",
            ])
            .arg("--socket")
            .arg(self.socket())
            .args(&self.extra)
            .arg(&self.mnt)
            .env("RUST_LOG", "debug")
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start thinfs mount");
        self.child = Some(child);
        // Up to HANG: a loaded machine or the dm guest's TCG can take a
        // while to open a pool; a daemon that fails says so at once (exited
        // early).
        let t = std::time::Instant::now();
        while t.elapsed() < HANG {
            // Reading (not stat) needs a live daemon: a stale mount may still
            // answer stat from the kernel cache.
            if std::fs::read(self.mnt.join(".thinfs/pool.json")).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                let log = self.log();
                let tail: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
                panic!("thinfs mount exited early ({st}):\n{}", tail.join("\n"));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("mount did not come up: {}", self.log());
    }

    pub fn socket(&self) -> PathBuf {
        self.scratch.path().join("ctl.sock")
    }

    /// Run the thinfs CLI against this daemon as root.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(thinfs_bin())
            .args(args)
            .env("THINFS_SOCKET", self.socket())
            .output()
            .expect("run thinfs")
    }

    /// The shell command line that runs the CLI against this daemon. The
    /// binary is copied into the scratch directory first: the build tree
    /// may not be reachable by other users (e.g. under a 0700 temp dir).
    pub fn cli_sh(&self, args: &str) -> String {
        let copy = self.scratch.path().join("thinfs-cli");
        if !copy.exists() {
            std::fs::copy(thinfs_bin(), &copy).expect("copy thinfs binary");
        }
        format!(
            "THINFS_SOCKET={} {} {args}",
            self.socket().display(),
            copy.display()
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Wait until a line of the daemon's log contains every one of
    /// `words` (see [`wait_event`]); returns that line.
    pub fn wait_log(&self, words: &[&str]) -> String {
        let find = || {
            self.log()
                .lines()
                .find(|l| words.iter().all(|w| l.contains(w)))
                .map(str::to_string)
        };
        wait_event(
            || format!("a log line with {words:?} in:\n{}", self.log()),
            || find().is_some(),
        );
        find().unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL the daemon, as a crash would; the mount stays, stale.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop the daemon cleanly; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        // Up to HANG before SIGKILL: a clean stop syncs and unmounts every
        // image, which takes long on a loaded machine, and a killed daemon
        // would leave filesystems that the next checks expect clean.
        let t = std::time::Instant::now();
        while t.elapsed() < HANG {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        self.stop();
        // A killed or stuck daemon leaves its mount: detach it.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if mounts.contains(&format!(" {} ", self.mnt.display())) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
        }
        wait_no_loops(self.scratch.path());
    }
}

/// Run a shell command as `nobody` (uid/gid 65534, no groups); returns
/// (success, stdout+stderr).
pub fn as_nobody(cmd: &str) -> (bool, String) {
    as_user(65534, 65534, &[], cmd)
}

/// Run a shell command as uid/gid with the given supplementary groups.
pub fn as_user(uid: u32, gid: u32, groups: &[u32], cmd: &str) -> (bool, String) {
    let mut c = std::process::Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!(
            "--groups={}",
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let o = c.args(["sh", "-c", cmd]).output().expect("run setpriv");
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), s)
}

/// errno of an io error (panics if it has none).
pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("no errno in {e}"))
}
