//! Root tests of the control protocol v2 against a real daemon: `thinfs
//! export` (every file type, snapshots, cancel by a vanished CLI, rights,
//! no tarball to a terminal), protocol versions both ways, the documented
//! JSON fields, and a clean shutdown that drops the engine.

mod common;

use common::tree::*;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn no_temp_snapshot(m: &TestMount) -> bool {
    !ok(&m.cli(&["list", "-t", "all", "-H", "-o", "name"])).contains("export-tmp")
}

#[test]
fn root_protocol_export_every_file_type() {
    let m = TestMount::start("proto-export");
    ok(&m.cli(&["create", "img"]));
    let img = m.path("img");
    let d = img.display();
    sh(&format!(
        "set -e; cd {d}
         mkdir -p dir/sub && echo hello > dir/sub/f && printf 'x%.0s' $(seq 1 5000) > big
         head -c 3000000 /dev/urandom > dir/random
         echo link > a && ln a dir/a2 && ln a dir/sub/a3
         ln -s ../a dir/rel && ln -s /nowhere/at/all abs && ln -s dir dirlink
         mkfifo fifo && mknod cdev c 1 3 && mknod bdev b 7 200
         chown 1234:5678 dir/sub/f && chmod 4750 dir/sub/f && chmod 1777 dir/sub
         chown -h 42:43 abs && chown 7:8 fifo
         setfattr -n user.colour -v blue dir/sub/f && setfattr -n user.d -v 1 dir
         setfattr -n trusted.t -v secret big
         setfacl -m u:1000:rwx,g:2000:r dir/random && setfacl -d -m u:1000:rx dir
         touch -h -d '2001-02-03 04:05:06.123456789' abs dir/sub/f cdev
         touch -d '1999-12-31 23:59:59.5' dir/sub"
    ));
    let s = Scratch::new("proto-export-out");
    let tar = s.path().join("img.tar");
    let o = m.cli(&["export", "img", "-o", tar.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    ok(&o);
    assert!(err.contains("exported img"), "{err}");
    let out = s.path().join("x");
    std::fs::create_dir(&out).unwrap();
    sh(&format!(
        "tar -x --xattrs --xattrs-include='*' --acls --numeric-owner -p -f {} -C {}",
        tar.display(),
        out.display()
    ));
    compare_trees(&img, &out);
    // The image was exported from a temporary snapshot, now gone.
    assert!(no_temp_snapshot(&m));
    assert!(
        m.log().contains("temporary snapshot img@export-tmp-"),
        "{}",
        m.log()
    );
    // To stdout (a pipe) too, the same bytes.
    let o = m.cli(&["export", "img", "-q"]);
    ok(&o);
    assert!(
        o.stderr.is_empty(),
        "--quiet: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let again = std::fs::read(&tar).unwrap();
    assert_eq!(o.stdout.len(), again.len());
}

#[test]
fn root_protocol_export_snapshot_while_image_changes() {
    let m = TestMount::start("proto-snap");
    ok(&m.cli(&["create", "img"]));
    std::fs::write(m.path("img/a"), b"v1").unwrap();
    std::fs::write(m.path("img/big"), pattern(8 << 20, 1)).unwrap();
    ok(&m.cli(&["snapshot", "img@s1"]));
    std::fs::write(m.path("img/a"), b"v2").unwrap();
    std::fs::write(m.path("img/b"), b"new").unwrap();
    // A writer keeps changing the image during the export.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (st, p) = (stop.clone(), m.path("img/big"));
    let writer = std::thread::spawn(move || {
        let mut i = 0u64;
        while !st.load(std::sync::atomic::Ordering::SeqCst) {
            std::fs::write(&p, pattern(1 << 20, 100 + i)).unwrap();
            i += 1;
        }
    });
    let s = Scratch::new("proto-snap-out");
    let tar = s.path().join("s1.tar");
    let o = m.cli(&["export", "img@s1", "-q", "-o", tar.to_str().unwrap()]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    ok(&o);
    let out = s.path().join("x");
    std::fs::create_dir(&out).unwrap();
    sh(&format!("tar -xpf {} -C {}", tar.display(), out.display()));
    assert_eq!(std::fs::read(out.join("a")).unwrap(), b"v1");
    assert!(!out.join("b").exists());
    assert_eq!(std::fs::read(out.join("big")).unwrap(), pattern(8 << 20, 1));
    compare_trees(&m.path("img/.snapshots/s1"), &out);
    // A snapshot is exported as it is: no temporary snapshot was made.
    assert!(!m.log().contains("export-tmp"), "{}", m.log());
}

/// A fifo whose reader reads `n` bytes, then holds it open without
/// reading until dropped.
struct StalledReader {
    fifo: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set once the `n` bytes were read: the writer is past them.
    filled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl StalledReader {
    fn start(fifo: &Path, n: usize) -> StalledReader {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let filled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, f2, p) = (stop.clone(), filled.clone(), fifo.to_path_buf());
        let t = std::thread::spawn(move || {
            let mut f = std::fs::File::open(&p).unwrap();
            let mut buf = vec![0u8; n];
            if f.read_exact(&mut buf).is_ok() {
                f2.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        StalledReader {
            fifo: fifo.to_path_buf(),
            stop,
            filled,
            t: Some(t),
        }
    }

    /// Has the writer sent the first `n` bytes?
    fn filled(&self) -> bool {
        self.filled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for StalledReader {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // A reader still waiting in open() for a writer (the export never
        // started) is released by a writer that comes and goes.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

/// A child process killed and reaped on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait for an event the test causes. The deadline only ends a hung
/// daemon: a loaded machine (the whole suite beside other work) may take
/// far longer than a quiet one, so it is generous, not a timing assumption.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "timed out waiting for {what} ({:?})",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn root_protocol_export_cancelled_when_the_cli_goes() {
    let mut m = TestMount::start("proto-cancel");
    ok(&m.cli(&["create", "big"]));
    std::fs::write(m.path("big/data"), pattern(64 << 20, 7)).unwrap();
    let s = Scratch::new("proto-cancel-out");
    for (k, sig) in ["INT", "KILL"].iter().enumerate() {
        let fifo = s.path().join(format!("fifo{k}"));
        sh(&format!("mkfifo {}", fifo.display()));
        let reader = StalledReader::start(&fifo, 1 << 20);
        let cli = Child(
            Command::new(thinfs_bin())
                .args(["export", "big", "-q", "-o", fifo.to_str().unwrap()])
                .env("THINFS_SOCKET", m.socket())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // The export is under way and stalled on its output: its
        // temporary snapshot exists and the reader took its first MiB.
        wait_for("the temporary snapshot", || !no_temp_snapshot(&m));
        wait_for("the export's first MiB", || reader.filled());
        let log0 = m.log().matches("cancelled").count();
        sh(&format!("kill -{sig} {}", cli.0.id()));
        // The cancel is done when its undo is: the temporary snapshot is
        // gone and the request's outcome is logged (right after).
        wait_for("the cancel undone and logged", || {
            no_temp_snapshot(&m) && m.log().matches("cancelled").count() > log0
        });
        drop(cli);
        drop(reader);
    }
    let log = m.log();
    assert!(
        log.contains("cancelled: the client hung up; undone")
            || log.contains("cancelled: the client closed; undone"),
        "{log}"
    );
    assert!(log.matches("export-tmp").count() >= 2, "{log}");
    // The daemon keeps serving, and a clean stop drops the engine: every
    // thread that held it (control workers, streams, expiry) was joined.
    ok(&m.cli(&["list"]));
    let st = m.stop().unwrap();
    assert!(st.success(), "{st}");
    assert!(m.log().contains("engine closed"), "{}", m.log());
}

#[test]
fn root_protocol_export_needs_admin() {
    let m = TestMount::start("proto-perm");
    ok(&m.cli(&["create", "img"]));
    let (good, out) = as_nobody(&m.cli_sh("export img -o /dev/null"));
    assert!(!good, "{out}");
    assert!(
        out.contains("permission denied") && out.contains("needs root"),
        "{out}"
    );
    assert!(no_temp_snapshot(&m));
}

#[test]
fn root_protocol_export_by_admin_group_member_into_own_file() {
    let m = TestMount::start_with("proto-admin", &["--admin-group", "users"]);
    ok(&m.cli(&["create", "img"]));
    std::fs::write(m.path("img/f"), b"data").unwrap();
    let s = Scratch::new("proto-admin-out");
    let dir = s.path().join("u1234");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(1234), Some(1234)).unwrap();
    // Group "users" (100): allowed; the output file is made as the user.
    let out = dir.join("img.tar");
    let (good, text) = as_user(
        1234,
        1234,
        &[100],
        &m.cli_sh(&format!("export img -q -o {}", out.display())),
    );
    assert!(good, "{text}");
    let md = std::fs::metadata(&out).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 1234));
    let list = Command::new("tar").arg("-tf").arg(&out).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&list.stdout), "f\n");
    // The user's own rights apply to the output: a file it may not write
    // (refused as an existing file, and with --force by its permissions).
    let theirs = s.path().join("root-only.tar");
    std::fs::write(&theirs, b"keep").unwrap();
    let (good, text) = as_user(
        1234,
        1234,
        &[100],
        &m.cli_sh(&format!("export img -q -o {}", theirs.display())),
    );
    assert!(!good && text.contains("refusing to overwrite"), "{text}");
    let (good, text) = as_user(
        1234,
        1234,
        &[100],
        &m.cli_sh(&format!("export img -q --force -o {}", theirs.display())),
    );
    assert!(!good && text.contains("Permission denied"), "{text}");
    assert_eq!(std::fs::read(&theirs).unwrap(), b"keep");
}

#[test]
fn root_protocol_export_to_a_terminal_is_refused() {
    let m = TestMount::start("proto-tty");
    ok(&m.cli(&["create", "img"]));
    // `script` gives the command a pseudo-terminal as stdout.
    let cmd = format!(
        "THINFS_SOCKET={} {} export img",
        m.socket().display(),
        thinfs_bin().display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("refusing to write a tarball to a terminal"),
        "{out}"
    );
    assert!(no_temp_snapshot(&m));
}

fn raw_lines(m: &TestMount, req: &str, n: usize) -> Vec<serde_json::Value> {
    let s = std::os::unix::net::UnixStream::connect(m.socket()).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(req.as_bytes()).unwrap();
    let mut rd = BufReader::new(s);
    (0..n)
        .map(|_| {
            let mut l = String::new();
            rd.read_line(&mut l).unwrap();
            serde_json::from_str(&l).unwrap()
        })
        .collect()
}

#[test]
fn root_protocol_version_1_gets_a_clear_error() {
    let m = TestMount::start("proto-v1");
    let a = raw_lines(
        &m,
        "{\"v\":1,\"op\":\"list\",\"kind\":\"all\"}\n{\"v\":2,\"op\":\"pool\"}\n",
        2,
    );
    assert_eq!(a[0]["ok"], false, "{}", a[0]);
    let e = a[0]["error"].as_str().unwrap();
    assert!(
        e.contains("CLI speaks protocol 1, daemon speaks 2") && e.contains("upgrade the CLI"),
        "{e}"
    );
    assert_eq!(a[0]["v"], 2);
    // The same connection, then a new one, keep being served.
    assert_eq!(a[1]["ok"], true, "{}", a[1]);
    ok(&m.cli(&["list"]));
    // A streaming request without its descriptor is refused cleanly.
    let a = raw_lines(&m, "{\"v\":2,\"op\":\"export\",\"target\":\"x\"}\n", 1);
    assert_eq!(a[0]["ok"], false);
    assert!(
        a[0]["error"]
            .as_str()
            .unwrap()
            .contains("needs 1 descriptor"),
        "{}",
        a[0]
    );
}

#[test]
fn root_protocol_new_cli_against_an_old_daemon() {
    // A daemon of protocol 1 answers a version-2 request as version 1 did.
    let s = Scratch::new("proto-old");
    let sock = s.path().join("old.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (&c).write_all(
            b"{\"v\":1,\"ok\":false,\"error\":\"invalid request: protocol version 2 not supported (daemon speaks 1)\",\"errno\":22}\n",
        )
        .unwrap();
        line
    });
    let o = Command::new(thinfs_bin())
        .args(["list"])
        .env("THINFS_SOCKET", &sock)
        .output()
        .unwrap();
    let sent = t.join().unwrap();
    assert!(sent.contains("\"v\":2"), "{sent}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the daemon speaks protocol 1, this CLI speaks 2"),
        "{err}"
    );
}

/// The keys of the documented `info --json` object (README, "JSON (stable)").
fn documented_fields() -> Vec<String> {
    let readme = include_str!("../README.md");
    let sec = &readme[readme.find("### JSON (stable)").expect("JSON section")..];
    let start = sec.find("```json").expect("json block") + 7;
    let block = &sec[start..start + sec[start..].find("```").unwrap()];
    let mut keys = Vec::new();
    let mut rest = block;
    while let Some(i) = rest.find('"') {
        let after = &rest[i + 1..];
        let j = after.find('"').unwrap();
        let word = &after[..j];
        let tail = after[j + 1..].trim_start();
        // Only object keys at the top level of the device: `"key":`,
        // not the keys of `usage` or `labels`.
        if tail.starts_with(':') && !["k", "mapped", "exclusive", "extents"].contains(&word) {
            keys.push(word.to_string());
        }
        rest = &after[j + 1..];
    }
    keys
}

#[test]
fn root_protocol_json_keeps_documented_fields() {
    let m = TestMount::start("proto-json");
    ok(&m.cli(&["create", "img"]));
    ok(&m.cli(&["snapshot", "img@s"]));
    ok(&m.cli(&["label", "img", "k=v"]));
    let fields = documented_fields();
    assert!(fields.len() >= 17, "{fields:?}");
    let check = |v: &serde_json::Value, what: &str| {
        let o = v.as_object().unwrap_or_else(|| panic!("{what}: {v}"));
        for f in &fields {
            assert!(o.contains_key(f), "{what}: no field {f:?} in {v}");
        }
        for f in ["mapped", "exclusive", "extents"] {
            if !o["usage"].is_null() {
                assert!(o["usage"].get(f).is_some(), "{what}: usage.{f}");
            }
        }
    };
    for verb in ["list", "usage", "tree"] {
        let v: serde_json::Value = serde_json::from_str(&ok(&m.cli(&[verb, "--json"]))).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 2, "{verb}: {v}");
        a.iter().for_each(|d| check(d, verb));
    }
    for t in ["img", "img@s"] {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&m.cli(&["info", t, "--json"]))).unwrap();
        check(&v, t);
        assert!(v["usage"]["mapped"].is_u64(), "{v}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&ok(&m.cli(&["info", "img", "--json"]))).unwrap();
    assert_eq!(v["kind"], "image");
    assert_eq!(v["state"], "ready");
    assert_eq!(v["labels"]["k"], "v");
    assert_eq!(v["children"][0], "img@s");
}

#[test]
fn root_protocol_export_leftover_swept_at_start() {
    let mut m = TestMount::start("proto-sweep");
    ok(&m.cli(&["create", "img"]));
    std::fs::write(m.path("img/data"), pattern(8 << 20, 5)).unwrap();
    // A user's snapshots of such names, one even with the export label a
    // request may set, are the user's: only the daemon's mark counts.
    ok(&m.cli(&["snapshot", "img@export-tmp-1-0"]));
    ok(&m.cli(&["label", "img@export-tmp-1-0", "thinfs.export=temporary"]));
    ok(&m.cli(&["snapshot", "img@export-tmp-2-0"]));
    // What a daemon killed during an export leaves: its temporary
    // snapshot. The export stalls on a pipe nobody reads past 64 KiB.
    let (mut r, w) = std::io::pipe().unwrap();
    let s = std::os::unix::net::UnixStream::connect(m.socket()).unwrap();
    thinfs::sys::scm::send_with_fds(
        s.as_fd(),
        b"{\"v\":2,\"op\":\"export\",\"target\":\"img\"}\n",
        &[w.as_fd()],
    )
    .unwrap();
    drop(w);
    let mut head = vec![0u8; 4096];
    r.read_exact(&mut head).unwrap();
    let temp = |m: &TestMount| {
        ok(&m.cli(&["list", "-t", "snapshot", "-H", "-o", "name"]))
            .lines()
            .filter(|l| {
                l.starts_with("img@export-tmp-") && !l.ends_with("-1-0") && !l.ends_with("-2-0")
            })
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let left = temp(&m);
    assert_eq!(left.len(), 1, "the export's temporary snapshot: {left:?}");
    m.kill9();
    drop(s);
    drop(r);
    m.spawn();
    let names = ok(&m.cli(&["list", "-t", "snapshot", "-H", "-o", "name"]));
    assert!(temp(&m).is_empty(), "{names} {}", m.log());
    assert!(names.contains("img@export-tmp-1-0"), "{names}");
    assert!(names.contains("img@export-tmp-2-0"), "{names}");
    assert!(m.log().contains("left by an export that did not finish"));
}

#[test]
fn root_protocol_stream_progress_and_cancel_message() {
    let m = TestMount::start("proto-msg");
    ok(&m.cli(&["create", "img"]));
    std::fs::write(m.path("img/data"), pattern(32 << 20, 3)).unwrap();
    // The output: a pipe nobody reads past its first bytes.
    let (mut r, w) = std::io::pipe().unwrap();
    let s = std::os::unix::net::UnixStream::connect(m.socket()).unwrap();
    thinfs::sys::scm::send_with_fds(
        s.as_fd(),
        b"{\"v\":2,\"op\":\"export\",\"target\":\"img\"}\n",
        &[w.as_fd()],
    )
    .unwrap();
    drop(w);
    let mut head = vec![0u8; 4096];
    r.read_exact(&mut head).unwrap();
    assert_eq!(&head[257..262], b"ustar", "a tar header comes first");
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    // Lines sent before the export knew its size say "total": null (CI,
    // under load, saw the first tick come while the temporary snapshot was
    // being made); the total is known once the tar has started.
    let total = loop {
        line.clear();
        rd.read_line(&mut line).unwrap();
        let p: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(p["v"], 2, "{line}");
        assert!(p["progress"]["done"].is_u64(), "{line}");
        assert!(p.get("ok").is_none(), "a progress line has no ok: {line}");
        match &p["progress"]["total"] {
            serde_json::Value::Null => continue,
            t => break t.as_u64().expect("total is a number"),
        }
    };
    assert!(total >= 32 << 20, "total {total}");
    (&s).write_all(b"{\"cancel\":true}\n").unwrap();
    let last = loop {
        line.clear();
        rd.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("progress").is_none() {
            break v;
        }
    };
    assert_eq!(last["ok"], false, "{last}");
    assert_eq!(last["errno"], libc::ECANCELED, "{last}");
    assert!(no_temp_snapshot(&m));
    assert!(
        m.log().contains("cancelled: the client asked; undone"),
        "{}",
        m.log()
    );
}
