//! thinfs as containerd's snapshotter on dm-thin, with Debian's real
//! containerd and runc: the image built by the containerd tests is
//! imported into a daemon on `--backend dm`, run, viewed, removed; a
//! kill -9 of the daemon while containerd runs; the pool gives the space
//! back. Needs device-mapper: `scripts/dm-test` runs it in a QEMU guest
//! (it is ignored elsewhere; `root_containerd` covers the reflink backend).

mod common;
mod containerd_env;

use common::*;
use containerd_env::*;
use std::time::Instant;

/// Active thin devices of this daemon's pool (`thinfs-<tag>-<id>` in
/// device-mapper), by their dm names: `/sys/block/dm-*/dm/name`.
fn thin_devices() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(name) = std::fs::read_to_string(e.path().join("dm/name")) else {
            continue;
        };
        let name = name.trim();
        let thin = name.starts_with("thinfs-")
            && name
                .rsplit('-')
                .next()
                .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        if thin {
            out.push(name.to_string());
        }
    }
    out
}

#[test]
#[ignore = "needs dm-thin: scripts/dm-test runs it in a QEMU guest"]
fn dm_containerd_import_run_view_remove_and_kill9() {
    let _turn = one_at_a_time();
    let dir = Scratch::new("ctddm");
    let snap_sock = dir.path().join("snap.sock");
    let sock = snap_sock.to_string_lossy().into_owned();
    let mut m = TestMount::start_with(
        "ctddmfs",
        &["--backend", "dm", "--containerd-socket", &sock],
    );
    let pool = m.cli(&["pool", "--json"]);
    let pool: serde_json::Value = serde_json::from_slice(&pool.stdout).expect("pool json");
    assert_eq!(pool["backend"], "dm", "{pool}");
    let tar = build_image(dir.path());
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    let used_before = pool_used(&m);
    let devs_before = thin_devices().len();

    // Import: two layers, Prepare + apply + Commit each, as thin devices.
    let t = Instant::now();
    ctd.import(&tar);
    eprintln!("import of 2 layers on dm: {} ms", t.elapsed().as_millis());
    assert_eq!(layer_count(&m), 2, "two committed layers: {}", calls(&m));
    wait_until("committed layers are deactivated", || {
        thin_devices().len() == devs_before
    });

    // Run: the second layer's file is there, the whited-out one is not,
    // and the rootfs (a thin clone of the top layer) is writable.
    let o = ctd.run(
        "d1",
        "cat /etc/added; test ! -e /etc/gone && echo nogone; echo written > /tmp/w && cat /tmp/w",
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "ctr run on dm failed: {out}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        calls(&m)
    );
    assert_eq!(
        out.lines().map(str::trim).collect::<Vec<_>>(),
        ["from layer two", "nogone", "written"],
        "{out}"
    );
    gc_wait(&ctd, &m, "the container's snapshot is removed", || {
        layer_count(&m) == 2
    });
    wait_until("the container's thin device is gone", || {
        thin_devices().len() == devs_before
    });

    // View: containerd gets the thin device itself, read-only.
    let top_key = snap_keys(&ctd)
        .into_iter()
        .map(|(k, _)| k)
        .find(|k| {
            let o = snap(&ctd, &["info", k]);
            String::from_utf8_lossy(&o.stdout).contains("\"Parent\"")
        })
        .expect("the top layer's key");
    view_kept(&ctd, "v1", &top_key);
    let o = snap(&ctd, &["mounts", "/x", "v1"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("-t ext4 /dev/")
            && out
                .trim_end()
                .rsplit(" -o ")
                .next()
                .is_some_and(|o| o.split(',').any(|o| o == "ro")
                    && o.split(',').any(|o| o == "errors=remount-ro")),
        "{out}"
    );
    let dev = out.split_whitespace().nth(3).expect("device").to_string();
    let real = std::fs::canonicalize(&dev).expect("the view's device");
    let kname = real
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(kname.starts_with("dm-"), "a thin device, not {dev}");
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/{kname}/ro"))
            .expect("ro flag")
            .trim(),
        "1",
        "a view's thin device is read-only"
    );
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
    snap_ok(&ctd, &["rm", "v1"]);
    gc_wait(&ctd, &m, "the view is removed", || layer_count(&m) == 2);

    // kill -9 of thinfs while containerd runs; restart; run again.
    m.kill9();
    m.spawn();
    let t = Instant::now();
    let (o, n) = ctd.run_when_reachable("d2", "cat /etc/added", HANG);
    eprintln!(
        "ctr run on dm works again {:.1} s after the restart ({n} tries)",
        t.elapsed().as_secs_f64()
    );
    assert!(
        o.status.success(),
        "ctr run after restart failed: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        m.log()
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "from layer two");
    gc_wait(
        &ctd,
        &m,
        "the second container's snapshot is removed",
        || layer_count(&m) == 2,
    );

    // Removing the image gives the pool its space back; no thin device is
    // left active.
    ctd.ok(&["images", "rm", "--sync", IMAGE]);
    ctd.ok(&["snapshots", "--snapshotter", "thinfs", "prepare", "gc-kick"]);
    ctd.ok(&["snapshots", "--snapshotter", "thinfs", "rm", "gc-kick"]);
    gc_wait(&ctd, &m, "containerd removed the layers", || {
        layer_count(&m) == 0
    });
    wait_until("no thin device of containerd's is active", || {
        thin_devices().len() == devs_before
    });
    wait_space_back(&m, used_before);
    drop(ctd);
    m.stop();
    assert!(
        thin_devices().is_empty(),
        "the stopped daemon left thin devices: {:?}",
        thin_devices()
    );
}

/// kill -9 of thinfs while a container runs on one of its thin devices:
/// the restarted daemon keeps that device (and the pool under it) instead
/// of failing to tear it down, containerd gets the same device again, the
/// container keeps writing its rootfs across the restart, new containers
/// start, and once the container is gone no thin device is left.
///
/// The container reports through its own stdout (`ctr run` in a thread):
/// in this guest `ctr tasks exec` cannot be used, because the tests run
/// chrooted into the host's root (not the mount namespace's root), so a
/// process joining a container's namespace sees the guest's root.
#[test]
#[ignore = "needs dm-thin: scripts/dm-test runs it in a QEMU guest"]
fn dm_containerd_kill9_while_a_container_runs() {
    let _turn = one_at_a_time();
    let dir = Scratch::new("ctddmrun");
    let snap_sock = dir.path().join("snap.sock");
    let sock = snap_sock.to_string_lossy().into_owned();
    let mut m = TestMount::start_with(
        "ctddmrunfs",
        &["--backend", "dm", "--containerd-socket", &sock],
    );
    let tar = build_image(dir.path());
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    ctd.import(&tar);
    let devs_before = thin_devices().len();
    // The container writes before the crash, waits through it until the
    // test puts /tmp/go in its rootfs (300 s at most: a failed test must
    // not leave it waiting), writes after, and prints its file.
    let long = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            ctd.run(
                "long",
                "echo before > /tmp/f; i=0; \
                 while [ ! -e /tmp/go ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done; \
                 echo after >> /tmp/f; cat /tmp/f",
            )
        });
        wait_until("the container's thin device is active", || {
            thin_devices().len() == devs_before + 1
        });
        // It has written its first line (read through its rootfs here).
        wait_until("the container wrote its first line", || {
            ctd.rootfs("long")
                .is_some_and(|r| std::fs::read(r.join("tmp/f")).is_ok_and(|d| d == b"before\n"))
        });
        let keys = snap_keys(&ctd);
        assert!(
            keys.iter().any(|(k, kind)| k == "long" && kind == "Active"),
            "the container's snapshot in {keys:?}"
        );
        let key = "long";
        let before = snap(&ctd, &["mounts", "/x", key]);
        assert!(
            before.status.success(),
            "{}",
            String::from_utf8_lossy(&before.stderr)
        );

        m.kill9();
        m.spawn();
        assert!(
            m.log().contains("using it again"),
            "the restarted daemon keeps the device the container holds:\n{}",
            m.log()
        );
        // containerd asking for the mounts again gets the same device.
        let after = snap(&ctd, &["mounts", "/x", key]);
        assert!(
            after.status.success(),
            "{}",
            String::from_utf8_lossy(&after.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&after.stdout),
            String::from_utf8_lossy(&before.stdout)
        );
        assert_eq!(
            thin_devices().len(),
            devs_before + 1,
            "still the one device"
        );
        // A new container starts while the first one runs.
        let (o, _) = ctd.run_when_reachable("short", "cat /etc/added", HANG);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "from layer two");
        let rootfs = ctd.rootfs("long").expect("the long container's rootfs");
        std::fs::write(rootfs.join("tmp/go"), b"").unwrap();
        h.join().expect("the long container's thread")
    });
    // It wrote its rootfs before and after the restart, on the kept device.
    assert!(
        long.status.success(),
        "{}{}",
        String::from_utf8_lossy(&long.stdout),
        String::from_utf8_lossy(&long.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&long.stdout).trim(),
        "before\nafter"
    );
    // --rm: its snapshot goes, and its device with it.
    gc_wait(&ctd, &m, "the container's snapshot is removed", || {
        layer_count(&m) == 2
    });
    wait_until("the container's thin device is gone", || {
        thin_devices().len() == devs_before
    });
    drop(ctd);
    m.stop();
    assert!(
        thin_devices().is_empty(),
        "the stopped daemon left thin devices: {:?}",
        thin_devices()
    );
}
