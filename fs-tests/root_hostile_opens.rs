//! Root tests of what users' open files cost the daemon, and what they see
//! of setuid/setgid bits: open files and directories of a hostile user
//! cannot take the daemon's descriptors from root and other users; opens
//! of `.thinfs` files share one rendered copy; the kernel never shows
//! setuid/setgid bits that a write, truncate or chown has cleared.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

/// A child process killed (by its own pid) and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    /// Start `script` with `args` as uid/gid `id` (no groups); its stdin
    /// is a pipe that keeps it alive.
    fn python_as(id: u32, script: &std::path::Path, args: &[String]) -> Reaped {
        Reaped(
            Command::new("setpriv")
                .arg(format!("--reuid={id}"))
                .arg(format!("--regid={id}"))
                .args(["--clear-groups", "/usr/bin/python3"])
                .arg(script)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start python"),
        )
    }

    /// The next line the child prints.
    fn line(&mut self) -> String {
        let mut line = String::new();
        let out = self.0.stdout.as_mut().expect("stdout");
        BufReader::new(out).read_line(&mut line).expect("read");
        line
    }
}

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The mode as `stat -c %a` shows it: coreutils asks statx for the mode
/// alone, which the kernel answers from its cache while the mode is valid
/// there (a full `stat` would refetch after a write, which marks size and
/// times stale).
fn mode_of(p: &std::path::Path) -> u32 {
    let o = Command::new("stat")
        .arg("-c")
        .arg("%a")
        .arg(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "stat {}", p.display());
    u32::from_str_radix(String::from_utf8_lossy(&o.stdout).trim(), 8).unwrap()
}

fn chmod(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// setuid/setgid cleared on disk by another user's write, truncate or by
/// root's chown are gone from `stat` through the mount at once, as on
/// ext4, whatever the kernel cached before.
#[test]
fn suid_bits_cleared_by_writes_are_not_shown_stale() {
    let m = TestMount::start("suidstat");
    std::fs::create_dir(m.path("base")).unwrap();
    chmod(&m.path("base"), 0o1777);
    let rounds = 5;
    let mut stale = Vec::new();
    for r in 0..rounds {
        for (i, mode) in [0o4777u32, 0o2777, 0o6777].into_iter().enumerate() {
            // One file per way of clearing the bits.
            let p = |what: &str| m.path(&format!("base/{what}-{r}-{i}"));
            let ways = ["write", "append", "trunc", "otrunc", "rootopen", "chown"];
            for w in ways {
                std::fs::write(p(w), b"abc").unwrap();
                chmod(&p(w), mode);
                // The kernel caches the attributes with the bits.
                assert_eq!(mode_of(&p(w)), mode, "{w}");
            }
            // Root holds one open (read-only) while nobody writes: the
            // backing file is root's.
            let held = std::fs::File::open(p("rootopen")).unwrap();
            let s = |w: &str| p(w).display().to_string();
            let (good, out) = as_nobody(&format!(
                "printf x | dd of={} bs=1 seek=1 conv=notrunc status=none && \
                 printf x >> {} && truncate -s 1 {} && : > {} && \
                 printf x | dd of={} bs=1 conv=notrunc status=none",
                s("write"),
                s("append"),
                s("trunc"),
                s("otrunc"),
                s("rootopen"),
            ));
            assert!(good, "nobody's writes: {out}");
            drop(held);
            std::os::unix::fs::chown(p("chown"), Some(1), Some(1)).unwrap();
            for w in ways {
                // On ext4 (and on disk here): suid always goes; sgid goes
                // with group exec (all of these modes have it).
                let want = mode & !0o6000;
                let got = mode_of(&p(w));
                if got != want {
                    stale.push(format!("{w} {mode:o}: stat shows {got:o}"));
                }
            }
        }
    }
    assert!(stale.is_empty(), "stale setuid/setgid bits: {stale:?}");
}

/// Python helper: raises its own descriptor limit, opens each PATH COUNT
/// times (a directory with O_DIRECTORY), says per path how many opens it
/// holds and which errno stopped it (0: none), then holds them until its
/// stdin ends.
const OPENER: &str = r#"
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held, out = [], []
args = sys.argv[1:]
for path, count in zip(args[0::2], args[1::2]):
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    n, err = 0, 0
    for _ in range(int(count)):
        try:
            held.append(os.open(path, flags))
            n += 1
        except OSError as e:
            err = e.errno
            break
    out.append("%d:%d" % (n, err))
print(" ".join(out), flush=True)
sys.stdin.read()
"#;

/// (opens held, errno that stopped them) per path, from the opener's line.
fn opened(line: &str) -> Vec<(usize, i32)> {
    line.split_whitespace()
        .map(|w| {
            let (n, e) = w.split_once(':').unwrap_or(("0", "0"));
            (n.parse().unwrap_or(0), e.parse().unwrap_or(0))
        })
        .collect()
}

fn pool_json(m: &TestMount) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(m.path(".thinfs/pool.json")).unwrap()).unwrap()
}

/// Handles the daemon counts for `uid` (0 when it holds none).
fn held_by(m: &TestMount, uid: u32) -> (u64, u64) {
    let v = pool_json(m);
    let u = &v["fuse"]["handles"]["by_uid"][uid.to_string()];
    (
        u["handles"].as_u64().unwrap_or(0),
        u["passthrough"].as_u64().unwrap_or(0),
    )
}

/// Images `base` (1777, with a file `pub` and a directory `d`) and
/// `other` (with a file `keep`); the opener script, returned.
fn setup_images(m: &TestMount) -> std::path::PathBuf {
    std::fs::create_dir(m.path("base")).unwrap();
    std::fs::create_dir(m.path("other")).unwrap();
    std::fs::write(m.path("other/keep"), b"other").unwrap();
    chmod(&m.path("base"), 0o1777);
    std::fs::write(m.path("base/pub"), b"public").unwrap();
    std::fs::create_dir(m.path("base/d")).unwrap();
    let script = m.scratch.path().join("opener.py");
    std::fs::write(&script, OPENER).unwrap();
    script
}

/// While nobody holds its opens: root opens, creates, lists another image,
/// snapshots it and uses the CLI; another user opens, creates and lists,
/// directories and `.thinfs` files included.
fn root_and_another_user_work(m: &TestMount) {
    // Root works.
    // The CLI with a time limit: a starved daemon never answers it (the
    // limit only ends a hang: CI may be busy).
    let cli = Command::new("timeout")
        .arg("120")
        .arg(thinfs_bin())
        .args(["list", "-o", "name", "-H"])
        .env("THINFS_SOCKET", m.socket())
        .output()
        .expect("run thinfs");
    let cli = ok(&cli);
    assert_eq!(cli, "base\nother\n");
    std::fs::write(m.path("base/root-new"), b"root").unwrap();
    assert_eq!(std::fs::read(m.path("base/root-new")).unwrap(), b"root");
    let names: Vec<_> = std::fs::read_dir(m.path("other"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.iter().any(|n| n == "keep"), "{names:?}");
    std::fs::create_dir(m.path("other/.snapshots/during")).unwrap();
    assert_eq!(
        std::fs::read(m.path("other/.snapshots/during/keep")).unwrap(),
        b"other"
    );
    // Another user works, opens of directories and .thinfs files included.
    let (good, out) = as_user(
        4242,
        4242,
        &[],
        &format!(
            "set -e; cd {}; echo mine > u4242; cat u4242 pub >/dev/null; ls d >/dev/null; \
             ls {} >/dev/null; cat {} >/dev/null; ls {} >/dev/null; {}",
            m.path("base").display(),
            m.path("other").display(),
            m.path(".thinfs/tree").display(),
            m.path(".thinfs/info").display(),
            m.cli_sh("list >/dev/null").replacen(
                "THINFS_SOCKET",
                "timeout 120 env THINFS_SOCKET",
                1
            )
        ),
    );
    assert!(good, "another user: {out}");
}

/// `nobody` holds more opens than the daemon has descriptors (files,
/// directories, `.thinfs` files; two processes, each with its own limit
/// raised): root and another user still open, create, list another image,
/// snapshot and use the CLI; nobody alone gets EMFILE, past its share.
#[test]
fn hostile_opens_leave_root_and_others_working() {
    let limit = 400;
    let arg = format!("--nofile={limit}:{limit}");
    let m = TestMount::start_wrapped("hostile-opens", &["prlimit", &arg], &[]);
    let v = pool_json(&m);
    assert_eq!(
        v["fuse"]["passthrough"], true,
        "this test needs passthrough"
    );
    let script = setup_images(&m);
    let targets = |files: usize, dirs: usize, ctl: usize| {
        vec![
            m.path("base/pub").display().to_string(),
            files.to_string(),
            m.path("base/d").display().to_string(),
            dirs.to_string(),
            m.path(".thinfs/tree").display().to_string(),
            ctl.to_string(),
        ]
    };
    // Two processes of nobody: 2 x (300 files + 150 dirs + 100 .thinfs
    // files) = 1100 opens asked for, against the daemon's 400 descriptors.
    let mut hogs = Vec::new();
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut h = Reaped::python_as(65534, &script, &targets(300, 150, 100));
        got.push(opened(&h.line()));
        hogs.push(h);
    }
    eprintln!("nobody's opens (held:errno per kind): {got:?}");

    root_and_another_user_work(&m);
    // A third process of nobody is refused directories and .thinfs files,
    // at once, but still opens files (passthrough: no descriptor held).
    let mut third = Reaped::python_as(65534, &script, &targets(50, 1, 1));
    let t = opened(&third.line());
    assert_eq!(t[0], (50, 0), "nobody's passthrough opens: {t:?}");
    assert_eq!(t[1], (0, libc::EMFILE), "nobody's opendir: {t:?}");
    assert_eq!(t[2], (0, libc::EMFILE), "nobody's .thinfs open: {t:?}");

    // nobody held every file open it asked for, more than the daemon's
    // limit, and was stopped by EMFILE on the rest, within its share.
    let files: usize = got.iter().map(|g| g[0].0).sum();
    assert_eq!(files, 600, "{got:?}");
    assert!(
        got.iter()
            .all(|g| g[1].1 == libc::EMFILE || g[2].1 == libc::EMFILE),
        "{got:?}"
    );
    let v = pool_json(&m);
    let h = &v["fuse"]["handles"];
    let share = h["share"].as_u64().unwrap();
    assert_eq!(h["nofile"].as_u64(), Some(limit));
    let (counted, passthrough) = held_by(&m, 65534);
    assert_eq!(counted, share, "{h}");
    assert_eq!(passthrough, 650, "{h}");
    let dirs: usize = got.iter().map(|g| g[1].0 + g[2].0).sum();
    assert_eq!(dirs as u64, share, "{got:?}");
    assert!(
        m.log()
            .contains("open refused (EMFILE): uid 65534 holds 25 open handles"),
        "no log line says who was refused"
    );
    // The daemon stays within its limit, with room to spare.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .unwrap()
        .count();
    assert!(
        fds < limit as usize * 3 / 4,
        "daemon holds {fds} descriptors"
    );
    drop(third);
    drop(hogs);
    // Given back when the opens go (RELEASE is asynchronous: wait).
    wait_event(
        || format!("nobody's handles given back: {:?}", held_by(&m, 65534)),
        || held_by(&m, 65534) == (0, 0),
    );
}

/// The same without kernel passthrough (as on kernels before 6.9): every
/// open file keeps a descriptor in the daemon, so nobody's file opens stop
/// at its share, and everyone else keeps working.
#[test]
fn hostile_opens_without_passthrough_stop_at_the_share() {
    let limit = 400;
    let arg = format!("--nofile={limit}:{limit}");
    let wrapper = ["env", "THINFS_NO_PASSTHROUGH=1", "prlimit", &arg];
    let m = TestMount::start_wrapped("hostile-opens-nopt", &wrapper, &[]);
    let script = setup_images(&m);
    let file = m.path("base/pub").display().to_string();
    let mut hogs = Vec::new();
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut h = Reaped::python_as(65534, &script, &[file.clone(), "300".into()]);
        got.push(opened(&h.line()));
        hogs.push(h);
    }
    eprintln!("nobody's opens without passthrough: {got:?}");
    root_and_another_user_work(&m);
    let v = pool_json(&m);
    assert_eq!(v["fuse"]["passthrough"], false);
    let share = v["fuse"]["handles"]["share"].as_u64().unwrap() as usize;
    assert_eq!(got[0][0].0 + got[1][0].0, share, "{got:?}");
    assert_eq!(got[1][0].1, libc::EMFILE, "{got:?}");
    let fds = v["fuse"]["handles"]["by_uid"]["65534"]["fds"].as_u64();
    assert_eq!(fds, Some(share as u64), "{v}");
    drop(hogs);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Thousands of opens of a large `.thinfs` file (and of a virtual
/// directory) share one rendering: the daemon's memory stays within a few
/// MiB whoever opens them (root: never refused; nobody: within its share).
#[test]
fn thinfs_opens_share_one_copy() {
    let m = TestMount::start("thinfs-opens");
    std::fs::create_dir(m.path("base")).unwrap();
    let t0 = std::time::Instant::now();
    for i in 0..40 {
        std::fs::create_dir(m.path(&format!("base/.snapshots/s{i:02}"))).unwrap();
    }
    eprintln!("40 snapshots in {:?}", t0.elapsed());
    let size = std::fs::read(m.path(".thinfs/devices.json")).unwrap().len();
    // As many as this process's hard limit lets the opener hold.
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse::<usize>().ok())
        .unwrap_or(1024);
    let opens = 5000.min(hard.saturating_sub(100));
    // Without sharing, root's opens alone would keep this much.
    let unshared = (size * opens) as u64 / 1024;
    let bound = 16 << 10;
    assert!(
        unshared > 3 * bound,
        "devices.json too small for the test: {size} bytes"
    );
    let script = m.scratch.path().join("opener.py");
    std::fs::write(&script, OPENER).unwrap();
    let pid = m.pid();
    let rss0 = rss_kib(pid);
    let args = |n: usize| {
        vec![
            m.path(".thinfs/devices.json").display().to_string(),
            n.to_string(),
            m.path(".thinfs/info").display().to_string(),
            (n / 10).to_string(),
        ]
    };
    let mut root = Reaped::python_as(0, &script, &args(opens));
    let r = opened(&root.line());
    assert_eq!(r, vec![(opens, 0), (opens / 10, 0)], "root's opens");
    let mut nobody = Reaped::python_as(65534, &script, &args(opens));
    let n = opened(&nobody.line());
    let rss = rss_kib(pid);
    eprintln!(
        "devices.json {size} bytes; {opens} opens by root and {n:?} by nobody: daemon RSS {rss0} -> {rss} KiB"
    );
    assert!(
        rss < rss0 + bound,
        "daemon RSS {rss0} -> {rss} KiB with {opens} opens of a {size}-byte file"
    );
    let share = pool_json(&m)["fuse"]["handles"]["share"].as_u64().unwrap() as usize;
    assert_eq!(n[0].0 + n[1].0, share, "nobody's opens: {n:?}");
    assert_eq!(n[1].1, libc::EMFILE, "nobody's opens: {n:?}");
    drop(root);
    drop(nobody);
}

/// A file held open keeps working (fsync, fallocate, SEEK_DATA,
/// ftruncate, copy_file_range, writes) after the daemon closed its inode's
/// descriptor to stay within budget: an open file pins none, its handle
/// holds none, and requests reopen the inode from its file handle.
#[test]
fn held_file_works_after_its_inode_descriptor_is_closed() {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let m = TestMount::start_wrapped("held-evicted", &["prlimit", "--nofile=300:300"], &[]);
    std::fs::create_dir(m.path("base")).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("base/held"))
        .unwrap();
    f.write_all(b"hello").unwrap();
    let mut other = std::fs::File::create(m.path("base/other")).unwrap();
    // 400 more inodes than the budget of 150 descriptors can hold.
    for i in 0..400 {
        std::fs::write(m.path(&format!("base/f{i}")), b"x").unwrap();
    }
    let v = pool_json(&m);
    let fds = v["fuse"]["inode_fds"].as_u64().unwrap();
    assert!(fds <= 150, "inode descriptors {fds}");
    f.sync_all().unwrap();
    // SAFETY: a plain call on an open descriptor.
    let e = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 1 << 20) };
    assert_eq!(e, 0, "posix_fallocate");
    f.set_len(1 << 20).unwrap();
    // SAFETY: a plain call on an open descriptor.
    let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert_eq!(data, 0, "SEEK_DATA");
    let (mut a, mut b) = (0i64, 0i64);
    // SAFETY: both descriptors are open; the offsets point to i64s.
    let n =
        unsafe { libc::copy_file_range(f.as_raw_fd(), &mut a, other.as_raw_fd(), &mut b, 5, 0) };
    assert_eq!(n, 5, "copy_file_range");
    other.flush().unwrap();
    f.set_len(5).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b" world").unwrap();
    let mut s = String::new();
    std::fs::File::open(m.path("base/held"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "hello world");
    assert_eq!(std::fs::read(m.path("base/other")).unwrap(), b"hello");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .unwrap()
        .count();
    assert!(fds < 250, "daemon holds {fds} descriptors");
}
