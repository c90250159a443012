//! thinfs as containerd's snapshotter, with Debian's real containerd and
//! runc: an OCI image built here (a static busybox layer, then a layer with
//! a new file and a whiteout), imported into thinfs, run, removed; a
//! kill -9 of the daemon while containerd runs; the layers seen (and
//! snapshotted) through the thinfs CLI.

mod common;
mod containerd_env;

use common::*;
use containerd_env::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn root_containerd_import_run_remove_and_kill9() {
    let _turn = one_at_a_time();
    // Declared in this order so that they are dropped in reverse:
    // containerd (and its shims) first, then the thinfs daemon, then files.
    let dir = Scratch::new("ctd");
    let snap_sock = dir.path().join("snap.sock");
    let sock = snap_sock.to_string_lossy().into_owned();
    let mut m = TestMount::start_with("ctdfs", &["--containerd-socket", &sock]);
    let mode = std::fs::metadata(&snap_sock).expect("snapshotter socket");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    assert_eq!(mode.uid(), 0);
    let tar = build_image(dir.path());
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    let plugins = ctd.ok(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("snapshotter") && l.contains("thinfs") && l.contains("ok")),
        "{plugins}"
    );
    let used_before = pool_used(&m);

    // Import: two layers, each Prepare + apply + Commit, into thinfs.
    let t = Instant::now();
    ctd.import(&tar);
    let import_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("import of 2 layers: {import_ms:.0} ms");
    let layers = containerd_rows(&m);
    assert_eq!(
        layers.len(),
        2,
        "two committed layers: {:?}\n{}",
        list_all(&m),
        calls(&m)
    );
    // containerd's snapshots are not users' images: not in the mount's root.
    let root: Vec<String> = std::fs::read_dir(&m.mnt)
        .expect("read mount root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(root, [".thinfs"], "mount root shows only .thinfs");
    // Both layers are committed and detached: no loop device is used.
    assert_eq!(pool_loops(&m), 0, "committed layers stay detached");
    let keys = ctd.ok(&["snapshots", "--snapshotter", "thinfs", "ls"]);
    assert_eq!(
        keys.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{keys}"
    );

    // Run: the second layer's file is there, the whited-out one is not,
    // and the rootfs is writable.
    let o = ctd.run(
        "c1",
        "cat /etc/added; cat /etc/keep; test ! -e /etc/gone && echo nogone; echo written > /tmp/w && cat /tmp/w",
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "ctr run failed: {out}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        m.log()
    );
    assert_eq!(
        out.lines().map(str::trim).collect::<Vec<_>>(),
        ["from layer two", "keep", "nogone", "written"],
        "{out}"
    );
    // The container's snapshot went with it (--rm): its device is freed.
    gc_wait(&ctd, &m, "the container's snapshot is removed", || {
        layer_count(&m) == 2
    });
    wait_until("the container's device is detached", || pool_loops(&m) == 0);

    // Latency of a container's snapshot: Prepare (a clone of the top
    // layer) + Mounts + Remove, as the daemon times them.
    let top_key = snap_keys(&ctd)
        .into_iter()
        .map(|(k, _)| k)
        .find(|k| {
            let o = snap(&ctd, &["info", k]);
            String::from_utf8_lossy(&o.stdout).contains("\"Parent\"")
        })
        .expect("the top layer's key");
    for i in 0..10 {
        let k = format!("lat-{i}");
        snap_ok(&ctd, &["prepare", &k, &top_key]);
        snap_ok(&ctd, &["mounts", "/x", &k]);
        snap_ok(&ctd, &["rm", &k]);
    }
    let log = m.log();
    let ms = |op: &str| -> Vec<f64> {
        log.lines()
            .filter(|l| l.contains(&format!("containerd: {op} ")) && l.contains("/lat-"))
            .filter_map(|l| l.rsplit(" in ").next()?.strip_suffix(" ms")?.parse().ok())
            .collect()
    };
    let (p, mo) = (ms("prepare"), ms("mounts"));
    // Remove of lat-N is called by containerd's GC, which waits 50 times
    // the length of its last run before the next (pause_threshold 0.02):
    // under load (CI with a QEMU guest beside it) the last Remove came
    // more than 20 s later: wait for them (up to HANG, which only ends a
    // hang).
    // containerd 1.6 also lets a removal that lands while a collection
    // runs wait for the next trigger (seen here: lat-9 still there after
    // 60 s with nothing else going on). Every 5 s without progress, one
    // more snapshot is prepared and removed, which triggers a collection;
    // that collection lists everything thinfs has, so a snapshot missing
    // from thinfs's List would still never be removed and fail this test.
    let t = Instant::now();
    let (mut seen, mut since, mut pokes) = (0, Instant::now(), 0);
    let removed =
        |log: &str| ms_count(log, "remove", "/lat-") + ms_count(log, "remove", "/gc-poke-");
    while removed(&m.log()) < 10 + pokes && t.elapsed() < HANG {
        let now = removed(&m.log());
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(5) {
            pokes += 1;
            let k = format!("gc-poke-{pokes}");
            snap_ok(&ctd, &["prepare", &k, &top_key]);
            snap_ok(&ctd, &["rm", &k]);
            since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("GC pokes needed: {pokes}");
    let log = m.log();
    let lat: Vec<&str> = log.lines().filter(|l| l.contains("/lat-")).collect();
    assert_eq!(
        ms_count(&log, "remove", "/lat-"),
        10,
        "containerd's GC removed the latency snapshots:\n{}",
        lat.join("\n")
    );
    let r = {
        let log = m.log();
        log.lines()
            .filter(|l| l.contains("containerd: remove ") && l.contains("/lat-"))
            .filter_map(|l| l.rsplit(" in ").next()?.strip_suffix(" ms")?.parse().ok())
            .collect::<Vec<f64>>()
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "latency (ms, mean/max of {}): prepare {:.1}/{:.1}, mounts {:.1}/{:.1}, remove {:.1}/{:.1}; sum of means {:.1}",
        p.len(),
        mean(&p),
        max(&p),
        mean(&mo),
        max(&mo),
        mean(&r),
        max(&r),
        mean(&p) + mean(&mo) + mean(&r)
    );
    assert_eq!(layer_count(&m), 2);
    wait_until("no device is attached", || pool_loops(&m) == 0);

    // View: a read-only device with the layer's files, mounted `ro`.
    view_kept(&ctd, "v1", &top_key);
    let o = snap(&ctd, &["mounts", "/x", "v1"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("-t ext4 /dev/loop")
            && out
                .trim_end()
                .rsplit(" -o ")
                .next()
                .is_some_and(|o| o.split(',').any(|o| o == "ro")
                    && o.split(',').any(|o| o == "errors=remount-ro")),
        "{out}"
    );
    let dev = out.split_whitespace().nth(3).expect("device").to_string();
    let mnt = dir.path().join("view");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    sh(&format!(
        "mount -t ext4 -o ro {dev} {m} && cat {m}/etc/added > {d}/view.out; umount {m}",
        m = mnt.display(),
        d = dir.path().display()
    ));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("view.out")).expect("view read"),
        "from layer two\n"
    );
    let loop_name = dev.trim_start_matches("/dev/");
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/{loop_name}/ro"))
            .expect("ro flag")
            .trim(),
        "1",
        "a view's block device is read-only"
    );
    // Update (labels) and Usage reach thinfs.
    snap_ok(&ctd, &["label", "v1", "thinfs.test/k=v"]);
    let info = snap(&ctd, &["info", "v1"]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"thinfs.test/k\": \"v\""));
    let o = snap(&ctd, &["usage", "v1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    snap_ok(&ctd, &["rm", "v1"]);
    gc_wait(&ctd, &m, "the view is removed", || layer_count(&m) == 2);

    // kill -9 of thinfs while containerd runs; restart; run again.
    m.kill9();
    m.spawn();
    // containerd redials the proxy with a backoff (about 2 s here): until
    // then its calls fail with "unavailable", nothing else may.
    let t = Instant::now();
    let (o, n) = ctd.run_when_reachable("c2", "cat /etc/added", HANG);
    eprintln!(
        "ctr run works again {:.1} s after the restart ({n} tries)",
        t.elapsed().as_secs_f64()
    );
    assert!(
        o.status.success(),
        "ctr run after restart failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "from layer two");
    gc_wait(
        &ctd,
        &m,
        "the second container's snapshot is removed",
        || layer_count(&m) == 2,
    );

    // Users see containerd's layers in `list -t all` as their own type; they
    // may snapshot a committed one and clone that snapshot, never change a
    // layer itself.
    let human = m.cli(&["list", "-t", "all"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("containerd"));
    let only = m.cli(&["list", "-t", "containerd", "--json"]);
    let only: Vec<serde_json::Value> = serde_json::from_slice(&only.stdout).expect("json");
    assert_eq!(only.len(), 2, "list -t containerd");
    let top = containerd_rows(&m)
        .into_iter()
        .find(|r| !r["parent"].is_null())
        .and_then(|r| r["name"].as_str().map(str::to_string))
        .expect("the second layer");
    let cli_ok = |args: &[&str]| {
        let o = m.cli(args);
        assert!(
            o.status.success(),
            "thinfs {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let base = format!("{top}@base");
    cli_ok(&["snapshot", &base]);
    cli_ok(&["clone", &base, "mine"]);
    let added = std::fs::read_to_string(m.path("mine/etc/added")).expect("layer file in the clone");
    assert_eq!(added, "from layer two\n");
    assert!(
        !m.path("mine/etc/gone").exists(),
        "the whiteout holds in the clone"
    );
    std::fs::write(m.path("mine/etc/mine"), "user data").expect("write in the clone");
    for refused in [
        vec!["destroy", top.as_str()],
        vec!["destroy", "-r", top.as_str()],
        vec!["rename", top.as_str(), "x"],
        vec!["rollback", base.as_str()],
        vec!["resize", top.as_str(), "2G"],
    ] {
        let o = m.cli(&refused);
        assert!(!o.status.success(), "thinfs {refused:?} must be refused");
    }
    assert_eq!(layer_count(&m), 2);

    // Removing the image: containerd's GC may not remove a layer a user
    // snapshotted (it has a child); once the user's snapshot and clone are
    // gone, it removes them all, the pool gives the space back and no
    // device is left.
    ctd.ok(&["images", "rm", "--sync", IMAGE]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(layer_count(&m), 2, "layers under a user's snapshot stay");
    cli_ok(&["destroy", "mine"]);
    cli_ok(&["destroy", &base]);
    // containerd's GC runs after a removal of its own.
    ctd.ok(&["snapshots", "--snapshotter", "thinfs", "prepare", "gc-kick"]);
    ctd.ok(&["snapshots", "--snapshotter", "thinfs", "rm", "gc-kick"]);
    gc_wait(&ctd, &m, "containerd removed the layers", || {
        layer_count(&m) == 0
    });
    wait_until("no device is attached", || pool_loops(&m) == 0);
    // The records go before the files and the trim: the space comes back a
    // moment after the count drops.
    wait_space_back(&m, used_before);
    let t = Instant::now();
    drop(ctd);
    eprintln!("containerd stopped in {:.1} s", t.elapsed().as_secs_f64());
    let log = m.log();
    let timings: Vec<&str> = log.lines().filter(|l| l.contains("containerd: ")).collect();
    eprintln!("{}", timings.join("\n"));
    let t = Instant::now();
    m.stop();
    eprintln!("thinfs stopped in {:.1} s", t.elapsed().as_secs_f64());
}

/// Kill the daemon at every step of Prepare, Commit and Remove: after a
/// restart each snapshot is either complete or gone, and nothing leaks
/// (no device, no loop device, no space).
#[test]
fn root_containerd_crash_at_every_step() {
    let _turn = one_at_a_time();
    let dir = Scratch::new("ctdcrash");
    let snap_sock = dir.path().join("snap.sock");
    let sock = snap_sock.to_string_lossy().into_owned();
    let mut m = TestMount::start_with("ctdcrashfs", &["--containerd-socket", &sock]);
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    // A snapshot kept for the whole test: `info probe` reaches thinfs
    // (Stat), so it tells when containerd is connected again.
    snap_ok(&ctd, &["prepare", "probe"]);
    let base = pool_used(&m);
    // A snapshot's record goes before its file and the trim: the space
    // comes back a moment after the count drops.
    let near_base = |m: &TestMount, what: &str| {
        let t = Instant::now();
        loop {
            let used = pool_used(m);
            if used <= base + (1 << 20) {
                break;
            }
            assert!(
                t.elapsed() < HANG,
                "{what}: pool used {used}, {base} at the start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let with_failpoint = |m: &mut TestMount, fp: &str| {
        m.stop();
        m.wrapper = vec!["env".into(), format!("THINFS_FAILPOINT={fp}")];
        m.spawn();
        let o = snap(&ctd, &["info", "probe"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };

    // Remove every snapshot containerd knows, then make its GC run (it
    // runs after a removal) until thinfs holds none: what containerd lost
    // track of in a crash is collected this way, as with devmapper.
    let collect = |m: &TestMount, what: &str| {
        for (k, _) in snap_keys(&ctd).into_iter().filter(|(k, _)| k != "probe") {
            let o = snap(&ctd, &["rm", &k]);
            assert!(
                o.status.success(),
                "{what}: rm {k}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let o = snap(&ctd, &["prepare", "gc-kick"]);
        assert!(
            o.status.success(),
            "{what}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            calls(m)
        );
        assert!(snap(&ctd, &["rm", "gc-kick"]).status.success(), "{what}");
        gc_wait(
            &ctd,
            m,
            &format!("{what}: containerd's GC empties thinfs"),
            || layer_count(m) == 1,
        );
        // Every check runs after a restart: the probe is not attached again
        // until containerd asks for its mounts.
        wait_until(&format!("{what}: no device left attached"), || {
            pool_loops(m) == 0
        });
        near_base(m, what);
    };

    // Prepare, killed before the device, after it, after it is Ready: the
    // call fails for containerd; thinfs has nothing, or a complete
    // snapshot that containerd's GC removes.
    for (fp, left) in [
        ("containerd.intent", 0),
        ("containerd.backend", 0),
        ("containerd.done", 1),
    ] {
        with_failpoint(&mut m, fp);
        let o = snap_once(&ctd, &["prepare", "k1"]);
        assert!(!o.status.success(), "{fp}: the daemon died in Prepare");
        restart(&mut m);
        assert_eq!(layer_count(&m), left + 1, "{fp}");
        assert_eq!(
            pool_loops(&m),
            0,
            "{fp}: nothing is attached after a restart"
        );
        collect(&m, fp);
    }

    // An active snapshot survives a kill -9 and is attached again when
    // containerd asks for its mounts; its filesystem is sound.
    snap_ok(&ctd, &["prepare", "k3"]);
    m.kill9();
    restart(&mut m);
    let o = snap(&ctd, &["mounts", "/x", "k3"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && out.contains("-t ext4 /dev/loop"),
        "{out}"
    );
    let dev = out
        .split_whitespace()
        .find(|w| w.starts_with("/dev/loop"))
        .expect("device in the mount command");
    let fsck = Command::new("fsck.ext4")
        .args(["-n", dev])
        .output()
        .expect("fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(pool_loops(&m), 1, "k3 only");
    collect(&m, "re-attach");

    // Commit, killed once thinfs wrote it: containerd's transaction failed,
    // so it still has the active key and not the committed one; its GC
    // then removes the committed device it does not know.
    snap_ok(&ctd, &["prepare", "k2"]);
    with_failpoint(&mut m, "containerd.commit");
    assert!(!snap_once(&ctd, &["commit", "c2", "k2"]).status.success());
    restart(&mut m);
    assert_eq!(layer_count(&m), 2, "the committed device and the probe");
    collect(&m, "commit");

    // Remove (containerd's GC calls it), killed between the record and the
    // delete: gone after the restart, and its space given back.
    snap_ok(&ctd, &["prepare", "k4"]);
    with_failpoint(&mut m, "containerd.remove");
    let _ = snap_once(&ctd, &["rm", "k4"]);
    let pid = m.pid();
    gc_wait(&ctd, &m, "the daemon died in Remove", || dead(pid));
    restart(&mut m);
    assert_eq!(layer_count(&m), 1, "only the probe");
    collect(&m, "remove");
    drop(ctd);
}

/// kill -9 of thinfs while a container runs on one of its devices: the
/// daemon comes back (the container's mount still holds the old pool),
/// the container keeps working, new containers start, and once the
/// container is gone nothing is left attached.
#[test]
fn root_containerd_kill9_while_a_container_runs() {
    let _turn = one_at_a_time();
    let dir = Scratch::new("ctdrun");
    let snap_sock = dir.path().join("snap.sock");
    // This one takes the socket from the config file (`containerd_socket`).
    let cfg = dir.path().join("thinfs.toml");
    std::fs::write(
        &cfg,
        format!("containerd_socket = \"{}\"\n", snap_sock.display()),
    )
    .expect("config");
    let cfg = cfg.to_string_lossy().into_owned();
    let mut m = TestMount::start_with("ctdrunfs", &["--config", &cfg]);
    let tar = build_image(dir.path());
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    ctd.import(&tar);
    let fifo = ctd.dir.join("fifo").to_string_lossy().into_owned();
    let runc = ctd.dir.join("runc").to_string_lossy().into_owned();
    ctd.ok(&[
        "run",
        "-d",
        "--snapshotter",
        "thinfs",
        "--fifo-dir",
        &fifo,
        "--runc-root",
        &runc,
        IMAGE,
        "long",
        "/bin/sh",
        "-c",
        "echo before > /tmp/f; exec sleep 300",
    ]);
    let mut last = String::new();
    let mut n = 0;
    let t = Instant::now();
    while t.elapsed() < HANG {
        n += 1;
        let o = ctd.ctr(&[
            "tasks",
            "exec",
            "--fifo-dir",
            &fifo,
            "--exec-id",
            &format!("probe{n}"),
            "long",
            "/bin/sh",
            "-c",
            "cat /tmp/f",
        ]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if o.status.success() && last.trim() == "before" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last.trim(), "before", "the container wrote its file");
    assert_eq!(pool_loops(&m), 1, "the container's device");

    let rootfs_dev = || {
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
        mounts
            .lines()
            .find(|l| l.contains(&format!("{}/", ctd.dir.display())) && l.contains("/long/rootfs"))
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .expect("the container's rootfs mount")
    };
    let before = rootfs_dev();

    m.kill9();
    m.spawn();
    assert!(
        m.log().contains("using it again"),
        "the restarted daemon reuses the pool the container holds"
    );
    // containerd asking for the mounts again gets the same device, not a
    // second one on the same file (one superblock per device).
    let o = snap(&ctd, &["mounts", "/x", "long"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains(&format!(" {before} ")),
        "{out} (rootfs on {before})"
    );
    assert_eq!(pool_loops(&m), 1, "still the one device");

    // The running container still reads and writes its rootfs.
    let o = ctd.ctr(&[
        "tasks",
        "exec",
        "--fifo-dir",
        &fifo,
        "--exec-id",
        "e1",
        "long",
        "/bin/sh",
        "-c",
        "echo after >> /tmp/f && cat /tmp/f",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "before\nafter");
    // A new container starts.
    let (o, _) = ctd.run_when_reachable("short", "cat /etc/added", HANG);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The first container ends; its snapshot goes, nothing stays attached.
    let _ = ctd.ctr(&["tasks", "kill", "-s", "KILL", "long"]);
    wait_until("the task stopped", || {
        ctd.ctr(&["tasks", "rm", "long"]).status.success()
    });
    ctd.ok(&["containers", "rm", "long"]);
    gc_wait(&ctd, &m, "the container's snapshot is removed", || {
        layer_count(&m) == 2
    });
    wait_until("no device is attached", || pool_loops(&m) == 0);
    drop(ctd);
}
