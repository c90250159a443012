//! Root tests of `thinfs import` against a real daemon: a directory with
//! every file type and tarballs of it (plain, gzip) compared entry by entry
//! with the source, export then import, hostile tarballs that try to write
//! outside the image, truncated tarballs, rights, and kill -9 during an
//! import: nothing is ever left behind.

mod common;

use common::tree::*;
use common::*;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The CLI's stderr.
fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Names of every image and snapshot.
fn names(m: &TestMount) -> String {
    ok(&m.cli(&["list", "-t", "all", "-H", "-o", "name"]))
}

/// A source tree with every file type, owners, modes, times, xattrs, ACLs.
fn make_source(dir: &Path) {
    let d = dir.display();
    sh(&format!(
        "set -e; cd {d}
         mkdir -p dir/sub empty && echo hello > dir/sub/f && printf 'x%.0s' $(seq 1 5000) > big
         head -c 3000000 /dev/urandom > dir/random
         echo link > a && ln a dir/a2 && ln a dir/sub/a3
         ln -s ../a dir/rel && ln -s /nowhere/at/all abs && ln -s dir dirlink
         mkfifo fifo && mknod cdev c 1 3 && mknod bdev b 7 200
         chown 1234:5678 dir/sub/f && chmod 4750 dir/sub/f && chmod 1777 dir/sub
         chown -h 42:43 abs && chown 7:8 fifo && chmod 2710 empty
         setfattr -n user.colour -v blue dir/sub/f && setfattr -n user.d -v 1 dir
         setfattr -n trusted.t -v secret big
         setfacl -m u:1000:rwx,g:2000:r dir/random && setfacl -d -m u:1000:rx dir
         touch -h -d '2001-02-03 04:05:06.123456789' abs dir/sub/f cdev
         touch -d '1999-12-31 23:59:59.5' dir/sub empty"
    ));
}

#[test]
fn root_backup_import_directory_and_its_tarballs() {
    let m = TestMount::start("imp-dir");
    let s = Scratch::new("imp-src");
    let src = s.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_source(&src);
    // A directory, walked by the CLI.
    let o = m.cli(&["import", "dimg", src.to_str().unwrap()]);
    ok(&o);
    assert!(err(&o).contains("imported dimg"), "{}", err(&o));
    compare_trees(&src, &m.path("dimg"));
    // It ends with a snapshot of what was imported.
    compare_trees(&src, &m.path("dimg/.snapshots/import"));
    assert!(names(&m).contains("dimg@import"), "{}", names(&m));
    // Sized to fit: far below the 1G default for 3 MB of content.
    let info = ok(&m.cli(&["info", "dimg", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let size = v["size"].as_u64().unwrap();
    assert!((256 << 20..512 << 20).contains(&size), "size {size}");
    // A tarball made by GNU tar (with its `./` root entry), plain and gzip,
    // the gzip one from stdin.
    let tar = s.path().join("src.tar");
    sh(&format!(
        "tar -c --xattrs --xattrs-include='*' --acls --numeric-owner -f {} -C {} .",
        tar.display(),
        src.display()
    ));
    ok(&m.cli(&["import", "timg", tar.to_str().unwrap(), "-q"]));
    compare_trees(&src, &m.path("timg"));
    let tgz = s.path().join("src.tar.gz");
    sh(&format!("gzip -c {} > {}", tar.display(), tgz.display()));
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} import --size 300M gimg - -q < {}",
            thinfs_bin().display(),
            tgz.display()
        ))
        .env("THINFS_SOCKET", m.socket())
        .output()
        .unwrap();
    ok(&o);
    assert!(o.stderr.is_empty(), "--quiet: {}", err(&o));
    compare_trees(&src, &m.path("gimg"));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&m.cli(&["info", "gimg", "--json"]))).unwrap();
    assert_eq!(v["size"].as_u64(), Some(300 << 20));
    // zstd (more in root_import_more).
    let zst = s.path().join("src.tar.zst");
    sh(&format!("zstd -q -o {} {}", zst.display(), tar.display()));
    ok(&m.cli(&["import", "zimg", zst.to_str().unwrap(), "-q"]));
    // A name in use is refused.
    let o = m.cli(&["import", "dimg", tar.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(err(&o).contains("exists"), "{}", err(&o));
    assert!(names(&m).contains("zimg"));
}

#[test]
fn root_backup_export_then_import_gives_the_same_tree() {
    let m = TestMount::start("imp-export");
    ok(&m.cli(&["create", "img"]));
    make_source(&m.path("img"));
    let s = Scratch::new("imp-export-out");
    let tar = s.path().join("img.tar");
    ok(&m.cli(&["export", "img", "-q", "-o", tar.to_str().unwrap()]));
    ok(&m.cli(&["import", "copy", tar.to_str().unwrap(), "-q"]));
    compare_trees(&m.path("img"), &m.path("copy"));
}

/// Write a tarball with Python's tarfile: `script` adds members to `t`.
fn pytar(out: &Path, script: &str) {
    let py = format!(
        "import tarfile, io\n\
         t = tarfile.open('{}', 'w', format=tarfile.PAX_FORMAT)\n\
         def f(name, data=b'x'):\n    i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))\n\
         def l(name, target, kind=tarfile.SYMTYPE):\n    i = tarfile.TarInfo(name); i.type = kind; i.linkname = target; t.addfile(i)\n\
         def d(name):\n    i = tarfile.TarInfo(name); i.type = tarfile.DIRTYPE; i.mode = 0o755; t.addfile(i)\n\
         {script}\n\
         t.close()\n",
        out.display()
    );
    let o = Command::new("python3").arg("-c").arg(&py).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn root_backup_import_hostile_tarballs_write_nothing_outside() {
    let m = TestMount::start("imp-hostile");
    let s = Scratch::new("imp-hostile");
    let outside = s.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let o = outside.display().to_string();
    let cases = [
        ("absolute", format!("f('{o}/abs')"), "absolute"),
        (
            "dotdot",
            "d('a'); f('a/../../../../../../..{o}/dd')".replace("{o}", &o),
            "..",
        ),
        (
            "symlink-dir",
            format!("l('esc', '{o}'); f('esc/pwned')"),
            "symlink",
        ),
        (
            "symlink-deeper",
            format!("d('x'); l('x/esc', '{o}'); d('x/esc/sub'); f('x/esc/sub/pwned')"),
            "symlink",
        ),
        (
            "hardlink-outside",
            "l('pw', '/etc/passwd', tarfile.LNKTYPE)".to_string(),
            "absolute",
        ),
        (
            "hardlink-dotdot",
            "f('ok'); l('pw', '../../../../etc/passwd', tarfile.LNKTYPE)".to_string(),
            "..",
        ),
    ];
    for (tag, script, why) in cases {
        let tar = s.path().join(format!("{tag}.tar"));
        pytar(&tar, &script);
        let out = m.cli(&["import", tag, tar.to_str().unwrap()]);
        assert!(!out.status.success(), "{tag}: must be refused");
        assert!(err(&out).contains(why), "{tag}: {}", err(&out));
        assert!(err(&out).contains("refused"), "{tag}: {}", err(&out));
        let left: Vec<_> = std::fs::read_dir(&outside).unwrap().collect();
        assert!(left.is_empty(), "{tag}: wrote outside: {left:?}");
        assert!(!names(&m).contains(tag), "{tag}: {}", names(&m));
    }
    // A symlink to a host directory is kept as a symlink (never followed),
    // and a symlink that is then replaced by a file is replaced, not
    // written through.
    let tar = s.path().join("fine.tar");
    pytar(
        &tar,
        &format!("l('esc', '{o}'); l('victim', '{o}/v'); f('victim', b'inside')"),
    );
    ok(&m.cli(&["import", "fine", tar.to_str().unwrap(), "-q"]));
    assert_eq!(
        std::fs::read_link(m.path("fine/esc")).unwrap(),
        PathBuf::from(&o)
    );
    assert_eq!(std::fs::read(m.path("fine/victim")).unwrap(), b"inside");
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
}

#[test]
fn root_backup_import_truncated_or_cut_tarballs_leave_nothing() {
    let mut m = TestMount::start("imp-trunc");
    let s = Scratch::new("imp-trunc");
    let src = s.path().join("src");
    std::fs::create_dir(&src).unwrap();
    sh(&format!(
        "cd {} && head -c 100000 /dev/urandom > one && head -c 100000 /dev/urandom > two",
        src.display()
    ));
    let tar = s.path().join("t.tar");
    sh(&format!(
        "tar -cf {} -C {} one two",
        tar.display(),
        src.display()
    ));
    let full = std::fs::read(&tar).unwrap();
    // Cut inside a file's data, right after the first entry (a header
    // boundary: the tar crate alone takes that for the end), and a
    // corrupted header checksum.
    let first_end = 512 + 100000usize.div_ceil(512) * 512;
    let mut corrupt = full.clone();
    corrupt[first_end + 10] ^= 0x55;
    let cases: [(&str, Vec<u8>); 3] = [
        ("mid", full[..50000].to_vec()),
        ("boundary", full[..first_end].to_vec()),
        ("corrupt", corrupt),
    ];
    for (tag, bytes) in cases {
        let p = s.path().join(format!("{tag}.tar"));
        std::fs::write(&p, &bytes).unwrap();
        let o = m.cli(&["import", tag, p.to_str().unwrap()]);
        assert!(!o.status.success(), "{tag}: must fail");
        assert!(
            err(&o).contains("nothing was imported"),
            "{tag}: {}",
            err(&o)
        );
        assert!(!names(&m).contains(tag), "{tag}: {}", names(&m));
    }
    // Too much content for the size asked: the image is full, a clear
    // error, nothing left.
    let big = s.path().join("big.tar");
    pytar(&big, "f('big', b'\\x01' * (40 << 20))");
    let o = m.cli(&["import", "full", big.to_str().unwrap(), "--size", "24M"]);
    assert!(!o.status.success(), "must not fit");
    assert!(err(&o).contains("is full"), "{}", err(&o));
    assert!(err(&o).contains("--size"), "{}", err(&o));
    assert!(!names(&m).contains("full"), "{}", names(&m));
    // The whole one imports.
    ok(&m.cli(&["import", "whole", tar.to_str().unwrap(), "-q"]));
    assert_eq!(
        std::fs::read(m.path("whole/two")).unwrap(),
        std::fs::read(src.join("two")).unwrap()
    );
    // Hidden devices of the failed imports are gone: the pool holds
    // exactly the devices of whole and whole@import.
    m.stop();
    let e = open(m.scratch.path());
    let mut devs: Vec<u32> = e.records().unwrap().iter().map(|r| r.dev.get()).collect();
    devs.sort();
    let back: Vec<u32> = e
        .backend()
        .list()
        .unwrap()
        .iter()
        .map(|d| d.get())
        .collect();
    assert_eq!(devs.len(), 2);
    assert_eq!(devs, back, "hidden devices left");
}

#[test]
fn root_backup_import_needs_root() {
    let m = TestMount::start_with("imp-rights", &["--admin-group", "root"]);
    let s = Scratch::new("imp-rights");
    let tar = s.path().join("t.tar");
    pytar(&tar, "f('a')");
    sh(&format!(
        "chmod 1777 {} && chmod 0644 {}",
        s.path().display(),
        tar.display()
    ));
    // A member of the admin group (gid 0) is still refused, with why.
    let (good, out) = as_user(
        4242,
        0,
        &[0],
        &m.cli_sh(&format!("import mine {}", tar.display())),
    );
    assert!(!good, "{out}");
    assert!(out.contains("needs root"), "{out}");
    assert!(out.contains("setuid"), "{out}");
    assert!(!names(&m).contains("mine"));
    // Restore too; backup (reads only) is allowed to the admin group.
    ok(&m.cli(&["create", "img"]));
    let file = s.path().join("img.thinfs");
    let (good, out) = as_user(
        4242,
        0,
        &[0],
        &m.cli_sh(&format!("backup img -q -o {}", file.display())),
    );
    assert!(good, "{out}");
    let (good, out) = as_user(
        4242,
        0,
        &[0],
        &m.cli_sh(&format!("restore {} mine", file.display())),
    );
    assert!(!good, "{out}");
    assert!(out.contains("needs root"), "{out}");
    assert!(!names(&m).contains("mine"));
}

#[test]
fn root_backup_import_kill9_leaves_nothing() {
    let s = Scratch::new("imp-kill-src");
    let tar = s.path().join("t.tar");
    pytar(&tar, "d('d'); f('d/a', b'1' * 100000)");
    for fp in ["import.hidden", "import.filled"] {
        let mut m =
            TestMount::start_wrapped("imp-kill", &["env", &format!("THINFS_FAILPOINT={fp}")], &[]);
        let o = m.cli(&["import", "k", tar.to_str().unwrap()]);
        assert!(!o.status.success(), "{fp}: the daemon must die there");
        m.kill9();
        m.wrapper.clear();
        m.spawn();
        assert!(!names(&m).contains('k'), "{fp}: {}", names(&m));
        assert!(!m.path("k").exists(), "{fp}");
        // The name is free and an import works.
        ok(&m.cli(&["import", "k", tar.to_str().unwrap(), "-q"]));
        assert_eq!(std::fs::read(m.path("k/d/a")).unwrap().len(), 100000);
        m.stop();
        // Exactly the devices of k and k@import are left.
        let e = open(m.scratch.path());
        let mut devs: Vec<u32> = e.records().unwrap().iter().map(|r| r.dev.get()).collect();
        devs.sort();
        let back: Vec<u32> = e
            .backend()
            .list()
            .unwrap()
            .iter()
            .map(|d| d.get())
            .collect();
        assert_eq!(devs.len(), 2, "{fp}");
        assert_eq!(devs, back, "{fp}: hidden devices left");
        assert!(e.receiving_pending().unwrap().is_empty());
    }
}

#[test]
fn root_backup_import_cancelled_when_the_cli_goes() {
    let m = TestMount::start("imp-cancel");
    let s = Scratch::new("imp-cancel");
    let tar = s.path().join("t.tar");
    pytar(&tar, "f('a', b'2' * (8 << 20)); f('b', b'3' * (8 << 20))");
    let bytes = std::fs::read(&tar).unwrap();
    let mut cli = Command::new(thinfs_bin())
        .args(["import", "c", "-", "-q"])
        .env("THINFS_SOCKET", m.socket())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Half the tarball, then nothing: the pipe stays open (we hold it).
    // The CLI hands the pipe itself to the daemon, so once these 8 MiB are
    // written the daemon's import has read all but a pipe's worth (64 KiB)
    // of them: it is under way, waiting for more.
    let mut input = cli.stdin.take().unwrap();
    std::io::Write::write_all(&mut input, &bytes[..bytes.len() / 2]).unwrap();
    cli.kill().unwrap();
    cli.wait().unwrap();
    // The daemon notices, stops reading and undoes, although the input
    // pipe is still open.
    m.wait_log(&["import", "undone"]);
    drop(input);
    assert!(!names(&m).contains('c'), "{}", names(&m));
    ok(&m.cli(&["import", "c", tar.to_str().unwrap(), "-q"]));
    assert_eq!(std::fs::read(m.path("c/b")).unwrap().len(), 8 << 20);
}

#[test]
fn root_backup_with_snapshots_restores_on_another_pool() {
    let a = TestMount::start("bk-a");
    ok(&a.cli(&["create", "img"]));
    make_source(&a.path("img"));
    ok(&a.cli(&["snapshot", "img@s1"]));
    sh(&format!(
        "set -e; cd {}; echo two > dir/new; rm big; chmod 0600 a; ln dir/new dir/new2",
        a.path("img").display()
    ));
    ok(&a.cli(&["snapshot", "img@s2"]));
    ok(&a.cli(&["label", "img@s2", "k=v"]));
    sh(&format!(
        "set -e; cd {}; head -c 2000000 /dev/urandom > headonly; setfattr -n user.h -v 1 headonly",
        a.path("img").display()
    ));
    let s = Scratch::new("bk-file");
    let file = s.path().join("img.thinfs");
    let f = file.to_str().unwrap();
    let o = a.cli(&["backup", "img", "--snapshots", "-o", f]);
    ok(&o);
    assert!(err(&o).contains("backed up img"), "{}", err(&o));
    // The temporary carrier of the head is gone.
    assert!(!names(&a).contains("backup-head"), "{}", names(&a));
    let v = ok(&a.cli(&["backup", "verify", f]));
    assert!(v.contains(": ok"), "{v}");
    assert!(
        v.contains("s1") && v.contains("s2") && v.contains("(head)"),
        "{v}"
    );
    // Another pool (another daemon, its own state).
    let b = TestMount::start("bk-b");
    ok(&b.cli(&["restore", f, "copy", "-q"]));
    compare_trees(&a.path("img"), &b.path("copy"));
    compare_trees(&a.path("img/.snapshots/s1"), &b.path("copy/.snapshots/s1"));
    compare_trees(&a.path("img/.snapshots/s2"), &b.path("copy/.snapshots/s2"));
    let n = names(&b);
    assert!(!n.contains("backup-head"), "{n}");
    assert!(!n.contains("restore"), "{n}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(&b.cli(&["info", "copy@s2", "--json"]))).unwrap();
    assert_eq!(info["labels"]["k"], "v", "{info}");
}

#[test]
fn root_backup_damage_is_found_by_verify_and_refused_by_restore() {
    let a = TestMount::start("bk-dmg");
    ok(&a.cli(&["create", "img"]));
    sh(&format!(
        "head -c 3000000 /dev/urandom > {}/f",
        a.path("img").display()
    ));
    ok(&a.cli(&["snapshot", "img@s1"]));
    let s = Scratch::new("bk-dmg-file");
    let file = s.path().join("img.thinfs");
    let f = file.to_str().unwrap();
    ok(&a.cli(&["backup", "img", "--snapshots", "-o", f, "-q"]));
    let good = std::fs::read(&file).unwrap();
    // One flipped byte in the middle of the first section.
    let at = 16 + 1_500_000usize;
    let mut bad = good.clone();
    bad[at] ^= 0x01;
    std::fs::write(&file, &bad).unwrap();
    let o = a.cli(&["backup", "verify", f]);
    assert!(!o.status.success());
    let e = err(&o);
    assert!(e.contains("damage in section s1"), "{e}");
    // The position: the damaged megabyte holds the flipped byte.
    let range = e.split("at bytes ").nth(1).unwrap();
    let (from, to) = range.split_once("..").unwrap();
    let from: usize = from.trim().parse().unwrap();
    let to: usize = to
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap();
    assert!(from <= at && at < to, "{from}..{to} must hold {at}");
    let o = a.cli(&["restore", f, "back"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("damage"), "{}", err(&o));
    assert!(!names(&a).contains("back"), "{}", names(&a));
    // Cut short: refused too.
    std::fs::write(&file, &good[..good.len() - 100]).unwrap();
    let o = a.cli(&["restore", f, "back"]);
    assert!(!o.status.success());
    assert!(!names(&a).contains("back"), "{}", names(&a));
    // The good file restores (same pool, another name).
    std::fs::write(&file, &good).unwrap();
    ok(&a.cli(&["restore", f, "back", "-q"]));
    assert_eq!(
        std::fs::read(a.path("back/f")).unwrap(),
        std::fs::read(a.path("img/f")).unwrap()
    );
}

#[test]
fn root_backup_restore_kill9_leaves_nothing() {
    let a = TestMount::start("bk-kill-a");
    ok(&a.cli(&["create", "img"]));
    sh(&format!("echo 1 > {}/f", a.path("img").display()));
    ok(&a.cli(&["snapshot", "img@s1"]));
    sh(&format!("echo 2 > {}/f", a.path("img").display()));
    ok(&a.cli(&["snapshot", "img@s2"]));
    let s = Scratch::new("bk-kill-file");
    let file = s.path().join("img.thinfs");
    let f = file.to_str().unwrap();
    ok(&a.cli(&["backup", "img", "--snapshots", "-o", f, "-q"]));
    drop(a);
    // receive.done: the first section (s1) was published, the others not.
    for fp in ["receive.hidden", "receive.done"] {
        let mut b = TestMount::start_wrapped(
            "bk-kill-b",
            &["env", &format!("THINFS_FAILPOINT={fp}")],
            &[],
        );
        let o = b.cli(&["restore", f, "r"]);
        assert!(!o.status.success(), "{fp}: the daemon must die there");
        b.kill9();
        b.wrapper.clear();
        b.spawn();
        let n = names(&b);
        assert!(n.trim().is_empty(), "{fp}: left: {n}");
        assert!(b.log().contains("left by a restore") || fp == "receive.hidden");
        ok(&b.cli(&["restore", f, "r", "-q"]));
        assert_eq!(std::fs::read(b.path("r/f")).unwrap(), b"2\n");
        assert_eq!(std::fs::read(b.path("r/.snapshots/s1/f")).unwrap(), b"1\n");
    }
}

#[test]
fn root_backup_kill9_during_backup_leaves_no_temporary_snapshot() {
    let mut m = TestMount::start("bk-kill-backup");
    ok(&m.cli(&["create", "img"]));
    sh(&format!(
        "head -c 4000000 /dev/urandom > {}/f",
        m.path("img").display()
    ));
    ok(&m.cli(&["snapshot", "img@mine"]));
    let s = Scratch::new("bk-kill-backup");
    let fifo = s.path().join("fifo");
    sh(&format!("mkfifo {}", fifo.display()));
    // A reader that never reads: the backup stalls with its temporary
    // snapshot taken.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut cli = Command::new(thinfs_bin())
        .args(["backup", "img", "-q", "-o", fifo.to_str().unwrap()])
        .env("THINFS_SOCKET", m.socket())
        .spawn()
        .unwrap();
    // Ready (a snapshot still being created is recovery's, not the sweep's).
    let ready = |m: &TestMount| {
        ok(&m.cli(&["list", "-t", "all", "-H", "-o", "name,state"]))
            .lines()
            .any(|l| l.contains("backup-head") && l.contains("ready"))
    };
    wait_event(|| "a ready temporary snapshot".into(), || ready(&m));
    m.kill9();
    let _ = cli.kill();
    let _ = cli.wait();
    m.spawn();
    let n = names(&m);
    assert!(!n.contains("backup-head"), "{n}");
    assert!(n.contains("img@mine"), "{n}");
    assert!(m.log().contains("left by a backup"), "{}", m.log());
}

#[test]
fn root_backup_cancelled_when_the_cli_goes_leaves_no_temporary_snapshot() {
    let m = TestMount::start("bk-cancel");
    ok(&m.cli(&["create", "img"]));
    sh(&format!(
        "head -c 4000000 /dev/urandom > {}/f",
        m.path("img").display()
    ));
    let s = Scratch::new("bk-cancel");
    let fifo = s.path().join("fifo");
    sh(&format!("mkfifo {}", fifo.display()));
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut cli = Command::new(thinfs_bin())
        .args(["backup", "img", "-q", "-o", fifo.to_str().unwrap()])
        .env("THINFS_SOCKET", m.socket())
        .spawn()
        .unwrap();
    wait_event(
        || "a temporary snapshot".into(),
        || names(&m).contains("backup-head"),
    );
    cli.kill().unwrap();
    cli.wait().unwrap();
    // The daemon stops writing to the stalled pipe and destroys the carrier.
    wait_event(
        || format!("the backup cancelled: {}", names(&m)),
        || !names(&m).contains("backup-head"),
    );
}

/// Is process `pid` alive (not gone, not a zombie)?
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// A backup file of `len` bytes (sparse): the magic, then holes, then a
/// trailer whose index length is `ilen` and whose hash is `hash`.
fn crafted(path: &Path, len: u64, ilen: u64, index: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.write_all_at(b"THINFS-BACKUP-1\n", 0).unwrap();
    f.set_len(len).unwrap();
    let mut tail = ilen.to_le_bytes().to_vec();
    tail.extend_from_slice(blake3::hash(index).as_bytes());
    tail.extend_from_slice(b"THINFS-BACKUP-END\n");
    let at = len - tail.len() as u64;
    f.write_all_at(&tail, at).unwrap();
    f.write_all_at(index, at - index.len() as u64).unwrap();
}

/// Issue 22, item 5: a 1 TiB sparse backup file (a few KiB on disk) whose
/// trailer claims an index of almost all of it aborted the daemon (an
/// allocation of that size). Now each crafted file fails its own request
/// with a clear error, and the daemon (same pid) and its mount go on.
#[test]
fn root_backup_restore_of_crafted_files_fails_alone() {
    let m = TestMount::start("bk-crafted");
    ok(&m.cli(&["create", "img"]));
    sh(&format!("echo kept > {}/f", m.path("img").display()));
    let pid = m.pid();
    let s = Scratch::new("bk-crafted-file");
    let file = s.path().join("evil.thinfs");
    let f = file.to_str().unwrap();
    let tib = 1u64 << 40;
    let tail = 8 + 32 + 18;
    let idx = |sections: &str| {
        format!(
            r#"{{"image":"evil","backend":"reflink","created":0,"labels":{{}},"sections":[{sections}]}}"#
        )
    };
    let sec = |offset: u64, length: u64, hashes: usize| {
        format!(
            r#"{{"name":"h","head":true,"identity":"","base":null,"size":1073741824,"created":0,"labels":{{}},"offset":{offset},"length":{length},"hashes":[{}]}}"#,
            vec![format!("\"{}\"", "0".repeat(64)); hashes].join(",")
        )
    };
    let cases: Vec<(u64, u64, Vec<u8>, &str)> = vec![
        // The issue's file: an index of almost 1 TiB.
        (tib, tib - tail - 16, Vec::new(), "index length is damaged"),
        // Within the bound but holes: not JSON, found at its first byte.
        (tib, 1 << 30, Vec::new(), "is damaged"),
        // A valid index (its hash right) whose section lies past the index.
        (
            tib,
            0,
            idx(&sec(tib - 4096, 1 << 20, 1)).into_bytes(),
            "lies outside",
        ),
        // A section of 1 TiB with one hash.
        (tib, 0, idx(&sec(16, tib / 2, 1)).into_bytes(), "hashes for"),
    ];
    for (len, ilen, index, want) in cases {
        let ilen = if index.is_empty() {
            ilen
        } else {
            index.len() as u64
        };
        crafted(&file, len, ilen, &index);
        let t0 = std::time::Instant::now();
        let o = m.cli(&["restore", f, "evil"]);
        assert!(!o.status.success(), "{want}: restored?");
        assert!(err(&o).contains(want), "{want}: {}", err(&o));
        assert!(t0.elapsed().as_secs() < 30, "{want}: {:?}", t0.elapsed());
        assert!(alive(pid), "{want}: the daemon died: {}", m.log());
        assert_eq!(m.pid(), pid);
        // The mount and the control socket still answer.
        let l = ok(&m.cli(&["list", "-H", "-o", "name"]));
        assert!(l.contains("img") && !l.contains("evil"), "{l}");
        assert_eq!(std::fs::read(m.path("img/f")).unwrap(), b"kept\n");
        let ls: Vec<_> = std::fs::read_dir(m.path("")).unwrap().collect();
        assert!(!ls.is_empty());
        // `backup verify` (the CLI's own reader) refuses it too.
        let o = m.cli(&["backup", "verify", f]);
        assert!(!o.status.success() && err(&o).contains(want), "{}", err(&o));
    }
}

/// A panic in a stream (test failpoints: in the operation's thread, and in
/// the stream's own thread once the operation is done) fails that request
/// alone, with an answer that says so; the daemon, its control socket and
/// the mount go on, and the next requests are served.
#[test]
fn root_backup_a_panic_in_a_stream_fails_that_request_alone() {
    for fp in ["stream.panic", "stream.panic-watch"] {
        let m =
            TestMount::start_wrapped("bk-panic", &["env", &format!("THINFS_FAILPOINT={fp}")], &[]);
        ok(&m.cli(&["create", "img"]));
        sh(&format!("echo kept > {}/f", m.path("img").display()));
        let pid = m.pid();
        let s = Scratch::new("bk-panic-file");
        let file = s.path().join("img.thinfs");
        let f = file.to_str().unwrap();
        for _ in 0..3 {
            let o = m.cli(&["backup", "img", "-q", "-o", f]);
            assert!(!o.status.success(), "{fp}: no failure");
            assert!(err(&o).contains("panicked"), "{fp}: {}", err(&o));
            assert!(alive(pid), "{fp}: the daemon died: {}", m.log());
            let l = ok(&m.cli(&["list", "-t", "all", "-H", "-o", "name"]));
            assert_eq!(l.trim(), "img", "{fp}: a temporary snapshot was left");
            assert_eq!(std::fs::read(m.path("img/f")).unwrap(), b"kept\n");
        }
        assert!(m.log().contains(&format!("failpoint {fp}")), "{}", m.log());
    }
}

/// A tree as deep as a user likes in an image (5000 directories, made
/// through the mount): `export` walked it recursively on a 2 MiB stack and
/// the stack overflow aborted the daemon. Now the export fails alone,
/// naming the bound, and the daemon and mount go on (a tree at the bound
/// exports: `service::tarwalk::tests::deep_trees_are_bounded`).
#[test]
fn root_backup_export_of_a_too_deep_tree_fails_alone() {
    let m = TestMount::start("bk-deep");
    ok(&m.cli(&["create", "img"]));
    let pid = m.pid();
    let top = m.path("img");
    sh(&format!(
        "python3 -c '
import os
fd = os.open(\"{}\", os.O_RDONLY | os.O_DIRECTORY)
for i in range(5000):
    os.mkdir(\"d\", dir_fd=fd)
    n = os.open(\"d\", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = n
'",
        top.display()
    ));
    let s = Scratch::new("bk-deep-out");
    let tar = s.path().join("t.tar");
    let t = tar.to_str().unwrap();
    let o = m.cli(&["export", "img", "-q", "-o", t]);
    assert!(!o.status.success(), "exported?");
    assert!(err(&o).contains("deeper than 1024"), "{}", err(&o));
    assert!(alive(pid), "the daemon died: {}", m.log());
    let l = ok(&m.cli(&["list", "-H", "-o", "name"]));
    assert_eq!(l.trim(), "img");
    assert!(std::fs::metadata(m.path("img/d/d/d")).unwrap().is_dir());
}
