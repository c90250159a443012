//! One live mount per device, whatever users do (through the real FUSE
//! mount): a cwd or an inotify watch held across the idle time, admin
//! operations raced by readers, and a randomized stress run. After each:
//! never two live ext4 superblocks of one device (counted by the kernel,
//! /sys/fs/ext4, and by the daemon), all fsync'd data present, and the
//! filesystems check clean.

mod common;

use common::*;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Live ext4 superblocks per device file of the pool in `state`, as the
/// kernel sees them: loop devices backed by the pool's device files that
/// carry a mounted ext4 (/sys/fs/ext4/loopN exists while it is mounted).
fn superblocks(state: &Path) -> HashMap<String, usize> {
    let all = thinfs::sys::loopdev::attached();
    let pool = state.join("state").join("pool.img");
    let pool = pool.to_string_lossy();
    let devices = state.join("state").join("devices");
    let devices = devices.to_string_lossy();
    let pool_devs: Vec<u64> = all
        .iter()
        .filter(|l| l.backing_file == pool)
        .map(|l| l.own_dev)
        .collect();
    let mut out = HashMap::new();
    for l in &all {
        let ours = pool_devs.contains(&l.backing_dev) || l.backing_file.starts_with(&*devices);
        if !ours {
            continue;
        }
        let name = l
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if Path::new("/sys/fs/ext4").join(&name).exists() {
            let file = l
                .backing_file
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            *out.entry(file).or_default() += 1;
        }
    }
    out
}

/// Samples the kernel's superblock count in the background; remembers the
/// worst it saw.
struct Watch {
    stop: Arc<AtomicBool>,
    worst: Arc<parking_lot::Mutex<(usize, String)>>,
    samples: Arc<AtomicUsize>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(scratch: &Path) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let worst = Arc::new(parking_lot::Mutex::new((0, String::new())));
        let samples = Arc::new(AtomicUsize::new(0));
        let (s, w, n, p) = (
            stop.clone(),
            worst.clone(),
            samples.clone(),
            scratch.to_path_buf(),
        );
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (f, c) in superblocks(&p) {
                    let mut g = w.lock();
                    if c > g.0 {
                        *g = (c, f);
                    }
                }
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch {
            stop,
            worst,
            samples,
            t: Some(t),
        }
    }

    /// Stop; assert never more than one superblock per device.
    fn check(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            t.join().unwrap();
        }
        let (n, f) = self.worst.lock().clone();
        assert!(
            n <= 1,
            "the kernel had {n} live ext4 superblocks of device file {f} at once"
        );
        assert!(self.samples.load(Ordering::Relaxed) > 0);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pool_json(m: &TestMount) -> serde_json::Value {
    serde_json::from_slice(&fs::read(m.path(".thinfs/pool.json")).unwrap()).unwrap()
}

/// The daemon's own count: never more than one live mount per device.
fn assert_daemon_census(m: &TestMount) {
    let v = pool_json(m);
    assert_eq!(
        v["fuse"]["max_mounts_per_device"], 1,
        "daemon saw a device mounted twice: {v}"
    );
}

/// `thinfs fsck NAME` must find the filesystem clean (e2fsck exit 0).
fn assert_fsck_clean(m: &TestMount, name: &str) {
    let o = m.cli(&["fsck", name]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "fsck {name}: {out}");
    assert!(
        !out.contains("MODIFIED") && !out.contains("differences"),
        "fsck {name} found damage: {out}"
    );
}

/// Append `line` to `p` and fsync.
fn append_sync(p: &Path, line: &str) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.write_all(line.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

fn write_sync(p: &Path, data: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(p)
        .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// A child process that keeps its cwd in `dir` and, after `delay`,
/// writes and fsyncs `name` there (through its cwd, not a path from root).
fn cwd_writer(dir: &Path, delay: f32, name: &str) -> std::process::Child {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "sleep {delay}; echo written-through-cwd > {name} && sync {name}; sleep 1"
        ))
        .current_dir(dir)
        .spawn()
        .expect("spawn cwd writer")
}

#[test]
fn root_one_mount_cwd_held_across_idle_time() {
    let m = TestMount::start_with("cwd", &["--idle-secs", "1"]);
    let w = Watch::start(m.scratch.path());
    fs::create_dir(m.path("base")).unwrap();
    fs::create_dir(m.path("base/d")).unwrap();
    write_sync(&m.path("base/d/first"), b"1");
    // Nothing is open; only the child's cwd holds the image. Nobody uses
    // it for 3 s (several idle passes), then other processes look up and
    // write, then the child writes through its cwd.
    let mut child = cwd_writer(&m.path("base/d"), 4.5, "cwdfile");
    std::thread::sleep(Duration::from_secs(3));
    let n = 3;
    for i in 0..n {
        write_sync(&m.path(&format!("base/d/other{i}")), b"x");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(child.wait().unwrap().success());
    // The file written through the cwd is in the filesystem users see...
    assert_eq!(
        fs::read(m.path("base/d/cwdfile")).unwrap(),
        b"written-through-cwd\n"
    );
    // ...and in a snapshot taken now (the snapshot froze the live mount).
    fs::create_dir(m.path("base/.snapshots/s1")).unwrap();
    assert_eq!(
        fs::read(m.path("base/.snapshots/s1/d/cwdfile")).unwrap(),
        b"written-through-cwd\n"
    );
    for i in 0..n {
        assert!(m.path(&format!("base/.snapshots/s1/d/other{i}")).exists());
    }
    w.check();
    assert_daemon_census(&m);
    assert_fsck_clean(&m, "base");
}

/// inotify handle on a path (held until dropped).
struct Inotify(#[allow(dead_code)] std::os::fd::OwnedFd);

impl Inotify {
    fn watch(p: &Path) -> Inotify {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscalls; the fd is owned below, the path is a
        // NUL-terminated copy.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_CLOEXEC);
            assert!(fd >= 0, "inotify_init1");
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            let wd = libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_MODIFY);
            assert!(wd >= 0, "inotify_add_watch {}", p.display());
            Inotify(std::os::fd::OwnedFd::from_raw_fd(fd))
        }
    }
}

#[test]
fn root_one_mount_inotify_watch_keeps_one_filesystem() {
    let m = TestMount::start_with("inotify", &["--idle-secs", "1"]);
    let w = Watch::start(m.scratch.path());
    fs::create_dir(m.path("base")).unwrap();
    append_sync(&m.path("base/log"), "line 0\n");
    let watch = Inotify::watch(&m.path("base/log"));
    // Appends with fsync to the watched file and new files, across several
    // idle passes.
    let mut lines = vec!["line 0\n".to_string()];
    for i in 1..12 {
        std::thread::sleep(Duration::from_millis(400));
        let l = format!("line {i}\n");
        append_sync(&m.path("base/log"), &l);
        lines.push(l);
        write_sync(&m.path(&format!("base/new{i}")), format!("{i}").as_bytes());
    }
    drop(watch);
    let got = String::from_utf8(fs::read(m.path("base/log")).unwrap()).unwrap();
    assert_eq!(got, lines.concat(), "fsync'd appends lost");
    for i in 1..12 {
        assert_eq!(
            fs::read(m.path(&format!("base/new{i}"))).unwrap(),
            format!("{i}").as_bytes()
        );
    }
    w.check();
    assert_daemon_census(&m);
    // A fresh daemon sees the same (what was fsync'd is on the device).
    drop(m);
}

/// A child process killed (and reaped) when dropped, even when the test
/// panics: no reader outlives its test.
struct Kill(std::process::Child);

impl Kill {
    /// Still running?
    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Threads that run until `stop`; dropping this sets it and joins them, even
/// when the test panics, so that the mount they hold is released and its
/// daemon stopped. Declare it after the mount it uses.
struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn new() -> Workers {
        Workers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    fn spawn(&mut self, f: impl FnOnce(Arc<AtomicBool>) + Send + 'static) {
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || f(stop)));
    }

    /// Stop and join; a worker's panic fails the test.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("worker thread");
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Run `cmd` as nobody in a loop until the returned guard is dropped.
fn reader_loop(cmd: String) -> Kill {
    Kill(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args([
                "sh",
                "-c",
                &format!("while :; do {{ {cmd}; }} >/dev/null 2>&1; done"),
            ])
            .spawn()
            .expect("spawn reader"),
    )
}

fn cli_ok(m: &TestMount, args: &[&str]) -> String {
    let o = m.cli(args);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "thinfs {args:?} failed: {out}");
    out
}

#[test]
fn root_one_mount_admin_ops_are_atomic_against_readers() {
    let m = TestMount::start_with("atomic", &["--idle-secs", "1"]);
    let w = Watch::start(m.scratch.path());
    fs::create_dir(m.path("base")).unwrap();
    write_sync(&m.path("base/f"), b"v0");
    cli_ok(&m, &["snapshot", "base@v0"]);
    let base = m.path("base/f").display().to_string();
    let snapf = m.path("base/.snapshots/v0/f").display().to_string();
    let mut r1 = reader_loop(format!("stat {base}"));
    let mut r2 = reader_loop(format!("stat {snapf}; ls {}", m.path("base").display()));
    // Rollback with --destroy-newer, five times, while readers look.
    for round in 0..5 {
        write_sync(&m.path("base/f"), format!("v{}", round + 1).as_bytes());
        cli_ok(&m, &["snapshot", &format!("base@n{round}")]);
        write_sync(&m.path("base/f"), b"after");
        cli_ok(&m, &["rollback", "base@v0", "--destroy-newer"]);
        assert_eq!(fs::read(m.path("base/f")).unwrap(), b"v0", "round {round}");
        assert!(
            !m.path(&format!("base/.snapshots/n{round}")).exists(),
            "newer snapshot destroyed"
        );
    }
    // Plain rollback (no newer snapshots) five times.
    for round in 0..5 {
        write_sync(&m.path("base/f"), format!("x{round}").as_bytes());
        cli_ok(&m, &["rollback", "base@v0"]);
        assert_eq!(fs::read(m.path("base/f")).unwrap(), b"v0");
    }
    // fsck and destroy of snapshots, raced by the same readers.
    for round in 0..3 {
        assert_fsck_clean(&m, "base");
        cli_ok(&m, &["snapshot", &format!("base@d{round}")]);
        let _ = fs::read(m.path(&format!("base/.snapshots/d{round}/f"))).unwrap();
        cli_ok(&m, &["destroy", &format!("base@d{round}")]);
    }
    assert!(r1.alive() && r2.alive(), "the readers ran all along");
    drop((r1, r2));

    // An open file: EBUSY naming the pid, and nothing has changed (the
    // newer snapshot survives).
    cli_ok(&m, &["snapshot", "base@keep"]);
    let held = fs::File::open(m.path("base/f")).unwrap();
    let o = m.cli(&["rollback", "base@v0", "--destroy-newer"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "rollback with an open file must fail");
    assert!(
        err.contains("busy") || err.contains("Busy") || err.contains("open"),
        "{err}"
    );
    assert!(
        err.contains(&std::process::id().to_string()),
        "message names the pid holding the file: {err}"
    );
    assert!(
        m.path("base/.snapshots/keep").exists(),
        "--destroy-newer destroyed a snapshot before the busy check"
    );
    let o = m.cli(&["fsck", "base"]);
    assert!(!o.status.success(), "fsck with an open file must fail");
    drop(held);
    cli_ok(&m, &["rollback", "base@v0", "--destroy-newer"]);
    assert!(!m.path("base/.snapshots/keep").exists());
    w.check();
    assert_daemon_census(&m);
    assert_fsck_clean(&m, "base");
}

/// Files whose fsync returned, in order: (name, content).
type Synced = Vec<(String, Vec<u8>)>;

/// A bounded random stress run: writers with fsync, readers, snapshots
/// (checked to hold everything fsync'd before them), snapshot destroys,
/// rollbacks and fsck of a second image, all with `--idle-secs 1`.
#[test]
fn root_one_mount_stress() {
    let secs: u64 = std::env::var("THINFS_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let m = Arc::new(TestMount::start_with("stress", &["--idle-secs", "1"]));
    let w = Watch::start(m.scratch.path());
    fs::create_dir(m.path("work")).unwrap();
    fs::create_dir(m.path("rb")).unwrap();
    write_sync(&m.path("rb/marker"), b"base");
    cli_ok(&m, &["snapshot", "rb@base"]);
    let mut workers = Workers::new();
    let ops = Arc::new(AtomicUsize::new(0));
    let synced: Arc<parking_lot::Mutex<Synced>> = Default::default();
    for t in 0..2u64 {
        let (m, ops, synced) = (m.clone(), ops.clone(), synced.clone());
        workers.spawn(move |stop| {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{t}-{i}");
                let data = pattern(4096 + (i as usize % 7) * 1000, t * 1_000_000 + i);
                write_sync(&m.path(&format!("work/{name}")), &data);
                synced.lock().push((name, data));
                i += 1;
                ops.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(30 + (i % 5) * 40));
            }
        });
    }
    {
        // Readers: stat and list both images (as nobody and as root).
        let (m2, ops2) = (m.clone(), ops.clone());
        workers.spawn(move |stop2| {
            while !stop2.load(Ordering::Relaxed) {
                let _ = fs::read_dir(m2.path("work")).map(|d| d.count());
                let _ = fs::metadata(m2.path("rb/marker"));
                let _ = fs::read(m2.path("rb/marker"));
                ops2.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(15));
            }
        });
    }
    let nobody = reader_loop(format!(
        "stat {} {}",
        m.path("rb/marker").display(),
        m.path("work").display()
    ));
    // Admin thread: snapshots of work (checked), destroys, rollbacks and
    // fsck of rb. A cwd held in work the whole time.
    let cwd = Kill(
        std::process::Command::new("sleep")
            .arg(format!("{}", secs + 5))
            .current_dir(m.path("work"))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut snaps = 0;
    let mut rng = 0x1234_5678u64;
    while Instant::now() < deadline {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        match rng % 6 {
            0 | 1 => {
                let before: Vec<(String, Vec<u8>)> = synced.lock().clone();
                let name = format!("s{snaps}");
                fs::create_dir(m.path(&format!("work/.snapshots/{name}"))).unwrap();
                snaps += 1;
                for (f, data) in before.iter().rev().take(20) {
                    let got = fs::read(m.path(&format!("work/.snapshots/{name}/{f}")))
                        .unwrap_or_else(|e| panic!("snapshot {name} lacks fsync'd {f}: {e}"));
                    assert_eq!(&got, data, "snapshot {name}: {f}");
                }
                if snaps > 3 {
                    let old = format!("work/.snapshots/s{}", snaps - 3);
                    fs::remove_dir(m.path(&old)).unwrap_or_else(|e| panic!("rmdir {old}: {e}"));
                }
            }
            2 => {
                write_sync(&m.path("rb/marker"), b"changed");
                cli_ok(&m, &["rollback", "rb@base"]);
                assert_eq!(fs::read(m.path("rb/marker")).unwrap(), b"base");
            }
            3 => {
                cli_ok(&m, &["snapshot", "rb@newer"]);
                cli_ok(&m, &["rollback", "rb@base", "--destroy-newer"]);
            }
            4 => assert_fsck_clean(&m, "rb"),
            _ => std::thread::sleep(Duration::from_millis(1200)),
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    workers.finish();
    let mut nobody = nobody;
    let nobody_ran = nobody.alive();
    drop((nobody, cwd));
    let all = synced.lock().clone();
    for (f, data) in &all {
        assert_eq!(
            &fs::read(m.path(&format!("work/{f}"))).unwrap(),
            data,
            "{f}"
        );
    }
    println!(
        "stress: {} operations ({} files fsync'd, {snaps} snapshots, nobody reader running to the end: {nobody_ran}) in {secs} s",
        ops.load(Ordering::Relaxed),
        all.len()
    );
    w.check();
    assert_daemon_census(&m);
    assert_fsck_clean(&m, "work");
    assert_fsck_clean(&m, "rb");
}
