//! How the CLI fails: a `thinfs mount` (with or without `--daemon`) that
//! cannot mount says why first, on a line of its own, with nothing of an
//! earlier run, and leaves no state directory or mount point it made.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn thinfs() -> Command {
    let mut c = Command::new(thinfs_bin());
    c.env_remove("THINFS_SOCKET").env_remove("THINFS_CONFIG");
    c
}

/// `thinfs mount [--daemon] --state STATE --socket SOCK MNT` (small pool).
fn mount(daemon: bool, state: &Path, sock: &Path, mnt: &Path) -> Output {
    let mut c = thinfs();
    c.arg("mount");
    if daemon {
        c.arg("--daemon");
    }
    c.arg("--state")
        .arg(state)
        .args(["--pool-size", "4G", "--socket"])
        .arg(sock)
        .arg(mnt)
        .output()
        .unwrap()
}

/// Stderr of a failed mount: exit 1, the reason `want` on the first line
/// (no `invalid request:` wrapper, no escaped newline); returns it.
fn failed(o: &Output, want: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.starts_with("thinfs: ") && first.contains(want),
        "first line {first:?}, want {want:?}; all: {err}"
    );
    assert!(!err.contains("\\n"), "an escaped newline: {err}");
    assert!(!err.contains("invalid request"), "{err}");
    err
}

#[test]
fn root_cli_errors_failed_daemon_says_why_first() {
    let m = TestMount::start("err-daemon");
    let s = m.scratch.path();
    let busy = format!("already mounted at {}", m.mnt.display());
    // A new state directory: made for the log, gone again.
    let o = mount(true, &s.join("new/state"), &s.join("b.sock"), &m.mnt);
    failed(&o, &busy);
    assert!(
        !s.join("new").exists(),
        "the state directory it made is left"
    );
    // An existing state directory with an earlier run's log: not shown,
    // and the directory stays.
    let old = s.join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(
        old.join("thinfs.log"),
        "[2026-01-01T00:00:00.000Z ERROR thinfs] stale line of an earlier run\nthinfs: earlier failure\n",
    )
    .unwrap();
    let o = mount(true, &old, &s.join("b.sock"), &m.mnt);
    let err = failed(&o, &busy);
    assert!(
        !err.contains("earlier"),
        "lines of an earlier run shown: {err}"
    );
    assert!(old.join("thinfs.log").exists());
    // It fails after making the mount point (the pool is in use): the
    // mount point and its new parent are gone again.
    let o = mount(true, &m.state, &s.join("b.sock"), &s.join("mp/x"));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("thinfs: "), "{err}");
    assert!(
        !err.contains("\\n") && !err.contains("invalid request"),
        "{err}"
    );
    assert!(!s.join("mp").exists(), "the mount point it made is left");
}

#[test]
fn root_cli_errors_failed_foreground_mount_cleans_up() {
    let m = TestMount::start("err-fg");
    let s = m.scratch.path();
    // Busy mount point, new state: no state directory left.
    let o = mount(false, &s.join("st/a"), &s.join("b.sock"), &m.mnt);
    failed(&o, &format!("already mounted at {}", m.mnt.display()));
    assert!(
        !s.join("st").exists(),
        "the state directory it made is left"
    );
    // The pool in use, new mount point: no mount point left.
    let o = mount(false, &m.state, &s.join("b.sock"), &s.join("mp/x"));
    assert_eq!(o.status.code(), Some(1));
    assert!(!s.join("mp").exists(), "the mount point it made is left");
}

/// Usage mistakes exit 2 (as README says), caught before any daemon is
/// asked: malformed arguments, missing or conflicting ones, bad values.
#[test]
fn root_cli_errors_usage_mistakes_exit_2() {
    let s = Scratch::new("err-usage");
    let nowhere = s.path().join("no.sock");
    let cases: &[&[&str]] = &[
        &["backup", "img"],
        &["backup", "-o", "f"],
        &["backup"],
        &["list", "-o", "name,bogus"],
        &["create", "b", "--size", "12Q"],
        &["create", ".b"],
        &["create", "a/b"],
        &["resize", "a", "abc"],
        &["import", "a", "/nonexistent", "--size", "zz"],
        &["snapshot", "a"],
        &["snapshot", "a@"],
        &["clone", "a", "b"],
        &["clone", "a@s", "b@c"],
        &["rollback", "a"],
        &["send", "-i", "s1", "--haves", "f", "a@s2"],
        &["send", "a"],
        &["haves", "a@s"],
        &["info", "a@"],
        &["mount", "--pool-size", "4Z", "/nonexistent/mnt"],
        &["mount", "--backend", "bogus", "/nonexistent/mnt"],
    ];
    for args in cases {
        let o = thinfs()
            .args(*args)
            .env("THINFS_SOCKET", &nowhere)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("invalid request"), "{args:?}: {err}");
    }
    assert!(!Path::new("/nonexistent").exists());
}
