//! Root tests of the CLI and the control socket against a real daemon:
//! unprivileged inspection, refused changes, the admin group, clone,
//! rollback, destroy, rename, resize, labels, and bad input.

mod common;

use common::*;
use std::fs;
use std::io::{BufRead, BufReader, Write};

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

fn fails(o: &std::process::Output, code: i32, msg: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(msg), "expected {msg:?} in: {err}");
}

#[test]
fn root_cli_inspection_for_anyone_changes_for_root() {
    let m = TestMount::start("cli-anyone");
    ok(&m.cli(&["create", "base"]));
    fs::write(m.path("base/f"), b"v1").unwrap();
    ok(&m.cli(&["snapshot", "base@v1"]));
    ok(&m.cli(&["clone", "base@v1", "web"]));
    ok(&m.cli(&["snapshot", "base@v2"]));
    ok(&m.cli(&["snapshot", "web@w1"]));

    // Inspection as nobody.
    for verb in [
        "list",
        "tree",
        "info base@v1",
        "usage",
        "pool",
        "list -t snapshot -o name,parent -H",
    ] {
        let (good, out) = as_nobody(&m.cli_sh(verb));
        assert!(good, "{verb} as nobody: {out}");
    }
    let (_, out) = as_nobody(&m.cli_sh("tree"));
    assert_eq!(
        out,
        "base (image)\n  base@v1 (snapshot)\n    web (clone)\n      web@w1 (snapshot)\n  base@v2 (snapshot)\n"
    );
    let (_, out) = as_nobody(&m.cli_sh("list -t snapshot -o name,parent -H"));
    assert_eq!(out, "base@v1  base\nbase@v2  base\nweb@w1   web\n");
    let (_, out) = as_nobody(&m.cli_sh("list --json"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("list --json parses");
    assert_eq!(v.as_array().unwrap().len(), 5);
    assert!(v[0]["usage"]["mapped"].as_u64().is_some());
    let (_, out) = as_nobody(&m.cli_sh("info web --json"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["parent_name"], "base@v1");
    assert_eq!(v["children"][0], "web@w1");
    let (_, out) = as_nobody(&m.cli_sh("pool --json"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backend"], "reflink");
    assert_eq!(v["devices"], 5);

    // Graphviz renders the graph.
    let dot = ok(&m.cli(&["tree", "--dot"]));
    let png = m.scratch.path().join("tree.png");
    let mut c = std::process::Command::new("dot")
        .args(["-Tpng", "-o"])
        .arg(&png)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("graphviz dot");
    c.stdin.take().unwrap().write_all(dot.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
    assert!(fs::metadata(&png).unwrap().len() > 1000);

    // Changes as nobody: refused with a message and exit 1.
    for verb in [
        "create x",
        "snapshot base@x",
        "destroy base@v1",
        "clone base@v1 y",
        "rollback base@v2",
        "rename web w",
    ] {
        let (good, out) = as_nobody(&m.cli_sh(verb));
        assert!(
            !good && out.contains("permission denied") && out.contains("needs root"),
            "{verb}: {out}"
        );
    }
    let (good, out) = as_nobody(&format!("{}; echo rc=$?", m.cli_sh("snapshot base@x")));
    assert!(good && out.contains("rc=1"), "{out}");
    let (good, out) = as_nobody(&format!("mkdir {}/base/.snapshots/x", m.mnt.display()));
    assert!(!good, "{out}");
    // Nothing of the state directory is open to other users.
    let (good, out) = as_nobody(&format!("ls {}", m.state.display()));
    assert!(!good && out.contains("Permission denied"), "{out}");
    let (good, out) = as_nobody(&format!("head -c1 {}/pool.img", m.state.display()));
    assert!(!good, "{out}");
    assert_eq!(
        ok(&m.cli(&["list", "-H", "-o", "name"])).lines().count(),
        5,
        "nothing was created"
    );
}

#[test]
fn root_cli_admin_group_delegates_changes() {
    let m = TestMount::start_with("cli-admin", &["--admin-group", "users"]);
    ok(&m.cli(&["create", "base"]));
    fs::write(m.path("base/f"), b"v1").unwrap();
    let member = |cmd: &str| as_user(1234, 1234, &[100], cmd);
    let (good, out) = member(&m.cli_sh("snapshot base@bymember"));
    assert!(good, "{out}");
    let (good, out) = member(&m.cli_sh("clone base@bymember memberclone"));
    assert!(good, "{out}");
    let (good, out) = member(&format!(
        "mkdir {}/base/.snapshots/viamount",
        m.mnt.display()
    ));
    assert!(good, "{out}");
    let (good, out) = as_user(4321, 4321, &[50], &m.cli_sh("snapshot base@nonmember"));
    assert!(!good && out.contains("needs root or group users"), "{out}");
    let (good, out) = as_user(
        4321,
        4321,
        &[50],
        &format!("mkdir {}/base/.snapshots/nm", m.mnt.display()),
    );
    assert!(!good, "{out}");
    let names = ok(&m.cli(&["list", "-H", "-o", "name"]));
    assert_eq!(names, "base\nbase@bymember\nbase@viamount\nmemberclone\n");
}

#[test]
fn root_cli_clone_rollback_destroy_rename_resize_label() {
    let m = TestMount::start("cli-ops");
    ok(&m.cli(&["create", "base", "--size", "512M"]));
    fs::write(m.path("base/f"), b"one").unwrap();
    ok(&m.cli(&["snapshot", "base@s1"]));
    fs::write(m.path("base/f"), b"two").unwrap();
    ok(&m.cli(&["snapshot", "base@s2"]));
    fs::write(m.path("base/f"), b"three").unwrap();

    // A clone is a top-level writable image.
    ok(&m.cli(&["clone", "base@s1", "web"]));
    assert_eq!(fs::read(m.path("web/f")).unwrap(), b"one");
    fs::write(m.path("web/f"), b"web").unwrap();
    assert_eq!(fs::read(m.path("base/.snapshots/s1/f")).unwrap(), b"one");

    // Rollback: refused while newer snapshots exist, then done; visible at once.
    fails(&m.cli(&["rollback", "base@s1"]), 1, "newer: s2");
    ok(&m.cli(&["rollback", "base@s2"]));
    assert_eq!(fs::read(m.path("base/f")).unwrap(), b"two");
    // Refused while a file is open in the image.
    let held = fs::File::open(m.path("base/f")).unwrap();
    fails(
        &m.cli(&["rollback", "base@s1", "--destroy-newer"]),
        1,
        "open in it",
    );
    drop(held);
    ok(&m.cli(&["rollback", "base@s1", "--destroy-newer"]));
    assert_eq!(fs::read(m.path("base/f")).unwrap(), b"one");
    assert!(!m.path("base/.snapshots/s2").exists());

    // Rename images and snapshots.
    ok(&m.cli(&["rename", "base@s1", "base@first"]));
    assert!(m.path("base/.snapshots/first").is_dir());
    fails(
        &m.cli(&["rename", "base@first", "web@x"]),
        1,
        "stays in its image",
    );
    ok(&m.cli(&["rename", "web", "site"]));
    assert_eq!(fs::read(m.path("site/f")).unwrap(), b"web");
    fails(&m.cli(&["rename", "site", "base"]), 1, "already exists");

    // Resize grows the filesystem online.
    let before = ok(&std::process::Command::new("df")
        .args(["-B1", "--output=size"])
        .arg(m.path("base"))
        .output()
        .unwrap());
    ok(&m.cli(&["resize", "base", "1G"]));
    let after = ok(&std::process::Command::new("df")
        .args(["-B1", "--output=size"])
        .arg(m.path("base"))
        .output()
        .unwrap());
    let num = |s: &str| s.lines().nth(1).unwrap().trim().parse::<u64>().unwrap();
    assert!(
        num(&after) > num(&before) + (400 << 20),
        "{before} -> {after}"
    );
    fails(&m.cli(&["resize", "base", "100M"]), 1, "shrinking");

    // fsck: refused while a file is open, clean otherwise.
    let held = fs::File::open(m.path("base/f")).unwrap();
    fails(&m.cli(&["fsck", "base"]), 1, "open in it");
    drop(held);
    assert!(ok(&m.cli(&["fsck", "base"])).contains("base: clean"));
    assert_eq!(fs::read(m.path("base/f")).unwrap(), b"one");
    let (good, out) = as_nobody(&m.cli_sh("fsck base"));
    assert!(!good && out.contains("needs root"), "{out}");

    // Labels.
    ok(&m.cli(&["label", "base", "owner=ci"]));
    assert!(ok(&m.cli(&["info", "base"])).contains("owner=ci"));
    ok(&m.cli(&["label", "base", "owner"]));
    assert!(!ok(&m.cli(&["info", "base"])).contains("owner=ci"));

    // Destroy: an image with snapshots needs -r; the clone survives its origin.
    fails(&m.cli(&["destroy", "base"]), 1, "use -r");
    ok(&m.cli(&["destroy", "base", "-r"]));
    assert!(!m.path("base").exists());
    assert_eq!(fs::read(m.path("site/f")).unwrap(), b"web");
    assert_eq!(
        ok(&m.cli(&["list", "-H", "-o", "name,parent"])),
        "site  -\n"
    );
}

#[test]
fn root_cli_bad_input_and_dead_daemon() {
    let mut m = TestMount::start("cli-bad");
    ok(&m.cli(&["create", "a"]));
    fails(&m.cli(&["info", "nope"]), 1, "not found");
    fails(&m.cli(&["snapshot", "a@"]), 2, "nothing after '@'");
    fails(&m.cli(&["snapshot", "a"]), 2, "NAME@SNAP");
    fails(&m.cli(&["create", "b", "--size", "12Q"]), 2, "unknown unit");
    fails(&m.cli(&["create", ".b"]), 2, "starts with '.'");
    fails(&m.cli(&["create", "a"]), 1, "already exists");
    fails(&m.cli(&["clone", "a@none", "c"]), 1, "no snapshot none");
    fails(&m.cli(&["list", "-o", "name,bogus"]), 2, "unknown field");
    fails(&m.cli(&["frobnicate"]), 2, "unrecognized subcommand");
    fails(&m.cli(&["list", "-t", "weird"]), 2, "invalid value");

    // A malformed request gets an error answer; the daemon keeps serving.
    let s = std::os::unix::net::UnixStream::connect(m.socket()).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(b"this is not json\n{\"v\":9,\"op\":\"pool\"}\n{\"v\":2,\"op\":\"pool\"}\n")
        .unwrap();
    let mut rd = BufReader::new(s);
    let mut answers = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        rd.read_line(&mut l).unwrap();
        answers.push(serde_json::from_str::<serde_json::Value>(&l).unwrap());
    }
    assert_eq!(answers[0]["ok"], false);
    assert_eq!(answers[0]["errno"], libc::EINVAL);
    assert!(answers[1]["error"].as_str().unwrap().contains("protocol 9"));
    assert_eq!(answers[2]["ok"], true);
    ok(&m.cli(&["list"]));

    // No daemon: a clear message, not a raw connect error.
    m.stop();
    fails(&m.cli(&["list"]), 1, "thinfs is not running");
}

/// `export -o` and `backup -o` never write through a symbolic link planted
/// at the output path (with or without --force), and replace an existing
/// file only with --force.
#[test]
fn root_cli_output_files_no_symlinks_no_overwrite_without_force() {
    let m = TestMount::start("cli-output");
    ok(&m.cli(&["create", "img"]));
    fs::write(m.path("img/f"), b"data").unwrap();
    let dir = m.scratch.path().join("out");
    fs::create_dir(&dir).unwrap();
    let secret = dir.join("secret");
    fs::write(&secret, b"root only").unwrap();
    for (verb, args) in [
        ("export", vec!["export", "img", "-q"]),
        ("backup", vec!["backup", "img", "-q"]),
    ] {
        // A symbolic link to another file.
        let link = dir.join(format!("{verb}-link"));
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        for force in [false, true] {
            let mut a = args.clone();
            a.extend(["-o", link.to_str().unwrap()]);
            if force {
                a.push("--force");
            }
            fails(&m.cli(&a), 1, "symbolic link");
            assert_eq!(fs::read(&secret).unwrap(), b"root only", "{verb} {force}");
        }
        // A dangling link: its target is not created.
        let dangling = dir.join(format!("{verb}-dangling"));
        let nowhere = dir.join(format!("{verb}-nowhere"));
        std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
        let mut a = args.clone();
        a.extend(["-o", dangling.to_str().unwrap()]);
        fails(&m.cli(&a), 1, "symbolic link");
        assert!(!nowhere.exists(), "{verb} created the link's target");
        // An existing file: refused without --force, replaced with it.
        let file = dir.join(format!("{verb}-file"));
        fs::write(&file, b"old").unwrap();
        let mut a = args.clone();
        a.extend(["-o", file.to_str().unwrap()]);
        fails(&m.cli(&a), 1, "--force");
        assert_eq!(fs::read(&file).unwrap(), b"old");
        a.push("--force");
        ok(&m.cli(&a));
        let len = fs::metadata(&file).unwrap().len();
        assert!(len > 1024, "{verb} --force wrote {len} bytes");
        // A new file is made as before.
        let new = dir.join(format!("{verb}-new"));
        let mut a = args.clone();
        a.extend(["-o", new.to_str().unwrap()]);
        ok(&m.cli(&a));
        assert!(fs::metadata(&new).unwrap().len() > 1024);
    }
}
