//! The daemon holds a bounded number of descriptors however many inodes the
//! kernel caches: with RLIMIT_NOFILE at 300, an unprivileged user creates
//! and stats thousands of files, and root (and everyone) keeps working.
//! Alone in its test binary: it lowers this process's descriptor limit,
//! which the daemon inherits.

mod common;

use common::*;
use std::fs;

#[test]
fn root_fd_budget_cached_inodes_do_not_exhaust_descriptors() {
    let st = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg("--nofile=300:300")
        .status()
        .expect("run prlimit (util-linux)");
    assert!(st.success());
    let m = TestMount::start("fdbudget");
    fs::create_dir(m.path("base")).unwrap();
    fs::create_dir(m.path("base/many")).unwrap();
    std::process::Command::new("chmod")
        .arg("1777")
        .arg(m.path("base/many"))
        .status()
        .unwrap();
    let dir = m.path("base/many").display().to_string();
    let n = 2000;
    // As nobody: create, stat and list; the kernel keeps every inode cached
    // (10 s TTL) while we go on.
    let (ok, out) = as_nobody(&format!(
        "cd {dir} && i=0; while [ $i -lt {n} ]; do echo $i > f$i || exit 1; i=$((i+1)); done; ls -l >/dev/null && stat f* >/dev/null"
    ));
    assert!(ok, "nobody's creates failed: {out}");
    // Root still works: a new file, the inspection files, the CLI.
    fs::write(m.path("base/root-file"), b"root").unwrap();
    assert_eq!(fs::read(m.path("base/root-file")).unwrap(), b"root");
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(m.path(".thinfs/pool.json")).unwrap()).unwrap();
    let inodes = v["fuse"]["inodes"].as_u64().unwrap();
    let fds = v["fuse"]["inode_fds"].as_u64().unwrap();
    println!("cached inodes {inodes}, inode descriptors {fds}");
    assert!(inodes >= n, "the kernel caches the files: {v}");
    assert!(fds <= 150, "descriptors stay within the budget: {v}");
    let o = m.cli(&["list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Every file, including those whose descriptor was closed, still reads
    // back (reopened from its file handle).
    let (ok, out) = as_nobody(&format!(
        "cd {dir} && i=0; while [ $i -lt {n} ]; do [ \"$(cat f$i)\" = $i ] || {{ echo bad f$i; exit 1; }}; i=$((i+1)); done"
    ));
    assert!(ok, "reading back: {out}");
    assert!(
        !m.log().contains("Too many open files"),
        "EMFILE in the log"
    );
}
