//! Root tests of the engine on the real reflink backend: real loop devices,
//! real XFS pool, real ext4 inside, real FICLONE. Test names start with
//! `root_` because they need root.

mod common;

use common::*;
use std::process::Command;
use thinfs::engine::Target;
use thinfs::error::Error;
use thinfs::meta::DeviceState;
use thinfs::types::{Bytes, Name};

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

#[test]
fn root_snapshot_keeps_old_bytes_clone_is_independent() {
    let s = Scratch::new("snap");
    let e = open(s.path());
    let img = e.create_image(&n("base"), None).unwrap();
    let m = e.mount(img.id).unwrap();
    let v1 = pattern(3 << 20, 1);
    write_file(m.root(), "data.bin", &v1);
    let snap = e.snapshot(img.id, &n("v1")).unwrap();
    let v2 = pattern(3 << 20, 2);
    write_file(m.root(), "data.bin", &v2);
    write_file(m.root(), "new.txt", b"after");

    let sm = e.mount(snap.id).unwrap();
    assert!(sm.read_only);
    assert_eq!(
        read_file(sm.root(), "data.bin").unwrap(),
        v1,
        "snapshot must hold the old bytes"
    );
    assert!(
        read_file(sm.root(), "new.txt").is_err(),
        "snapshot must not see later files"
    );
    let err = thinfs::sys::file::openat(
        sm.root(),
        "x".as_ref(),
        libc::O_CREAT | libc::O_WRONLY,
        0o644,
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(read_file(m.root(), "data.bin").unwrap(), v2);

    let c = e
        .clone_snapshot(&Target::parse("base@v1").unwrap(), &n("web"))
        .unwrap();
    assert_eq!(c.parent, Some(snap.id));
    let cm = e.mount(c.id).unwrap();
    assert!(!cm.read_only);
    assert_eq!(read_file(cm.root(), "data.bin").unwrap(), v1);
    write_file(cm.root(), "data.bin", b"clone");
    assert_eq!(
        read_file(sm.root(), "data.bin").unwrap(),
        v1,
        "clone writes must not reach the snapshot"
    );
    assert_eq!(
        read_file(m.root(), "data.bin").unwrap(),
        v2,
        "clone writes must not reach the origin"
    );

    // Destroying the snapshot re-parents the clone to the image.
    drop(sm);
    e.destroy(&Target::parse("base@v1").unwrap(), false)
        .unwrap();
    assert_eq!(e.record(c.id).unwrap().parent, Some(img.id));
    assert_eq!(read_file(cm.root(), "data.bin").unwrap(), b"clone");
}

#[test]
fn root_destroy_returns_space() {
    let s = Scratch::new("space");
    let e = open(s.path());
    let img = e.create_image(&n("big"), None).unwrap();
    let m = e.mount(img.id).unwrap();
    let before = e.pool_info().unwrap().status.used;
    write_file(m.root(), "blob", &pattern(200 << 20, 9));
    thinfs::sys::fsio::syncfs(m.root()).unwrap();
    let written = e.pool_info().unwrap().status.used;
    assert!(
        written > before + (150 << 20),
        "writing 200M must use pool space: {before} -> {written}"
    );
    let u = e.backend().usage(img.dev).unwrap();
    assert!(u.exclusive >= 150 << 20, "usage must show the data: {u:?}");
    drop(m);
    e.destroy(&Target::parse("big").unwrap(), false).unwrap();
    let after = std::cell::Cell::new(0);
    wait_event(
        || format!("destroy frees the space: {written} -> {}", after.get()),
        || {
            after.set(e.pool_info().unwrap().status.used);
            after.get() < written - (150 << 20)
        },
    );
}

#[test]
fn root_rollback_restores_and_refuses_newer() {
    let s = Scratch::new("rollback");
    let e = open(s.path());
    let img = e.create_image(&n("db"), None).unwrap();
    let m = e.mount(img.id).unwrap();
    write_file(m.root(), "f", b"one");
    e.snapshot(img.id, &n("s1")).unwrap();
    write_file(m.root(), "f", b"two");
    e.snapshot(img.id, &n("s2")).unwrap();
    write_file(m.root(), "f", b"three");
    drop(m);
    // Mounted images are refused.
    assert!(matches!(
        e.rollback(&Target::parse("db@s1").unwrap(), false),
        Err(Error::Busy(_))
    ));
    e.unmount(img.id);
    // s2 is newer than s1.
    let err = e
        .rollback(&Target::parse("db@s1").unwrap(), false)
        .unwrap_err();
    assert!(matches!(err, Error::Busy(_)), "{err}");
    e.rollback(&Target::parse("db@s2").unwrap(), false).unwrap();
    let m = e.mount(img.id).unwrap();
    assert_eq!(read_file(m.root(), "f").unwrap(), b"two");
    drop(m);
    e.unmount(img.id);
    e.rollback(&Target::parse("db@s1").unwrap(), true).unwrap();
    assert!(
        e.resolve(&Target::parse("db@s2").unwrap()).is_err(),
        "newer snapshot destroyed"
    );
    let m = e.mount(img.id).unwrap();
    assert_eq!(read_file(m.root(), "f").unwrap(), b"one");
}

#[test]
fn root_bad_input_gives_distinct_errors_and_creates_nothing() {
    let s = Scratch::new("bad");
    let e = open(s.path());
    let img = e.create_image(&n("a"), None).unwrap();
    let count = || e.records().unwrap().len();
    let n0 = count();
    assert!(matches!(
        e.create_image(&n("a"), None),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(Name::new(".x"), Err(Error::InvalidName { .. })));
    assert!(matches!(
        Target::parse("a@"),
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        Bytes::parse("12Q"),
        Err(Error::InvalidSize { .. })
    ));
    assert!(matches!(
        e.create_image(&n("tiny"), Some(Bytes(4096))),
        Err(Error::InvalidSize { .. })
    ));
    assert!(matches!(
        e.resolve(&Target::parse("nope").unwrap()),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        e.clone_snapshot(&Target::parse("a@nope").unwrap(), &n("c")),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        e.clone_snapshot(&Target::parse("a").unwrap(), &n("c")),
        Err(Error::Invalid(_))
    ));
    e.snapshot(img.id, &n("s")).unwrap();
    assert!(matches!(
        e.snapshot(img.id, &n("s")),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        e.destroy(&Target::parse("a").unwrap(), false),
        Err(Error::NotEmpty(_))
    ));
    assert_eq!(count(), n0 + 1);
    assert_eq!(Error::NotEmpty(String::new()).errno(), libc::ENOTEMPTY);
    drop(e);

    // A pool whose reserve exceeds its free space refuses new devices.
    let mut o = opts(s.path());
    o.reserve = Some(Bytes(1 << 50));
    let e = thinfs::engine::Engine::open_pool(&o).unwrap();
    let err = e.create_image(&n("b"), None).unwrap_err();
    assert!(matches!(err, Error::NoSpace(_)), "{err}");
    assert_eq!(err.errno(), libc::ENOSPC);
    let id = e.image_id(&n("a")).unwrap().unwrap();
    assert!(matches!(e.snapshot(id, &n("s2")), Err(Error::NoSpace(_))));
    assert!(e.image_id(&n("b")).unwrap().is_none());
}

#[test]
fn root_reopen_reattaches_and_leaves_nothing_behind() {
    let s = Scratch::new("reopen");
    {
        let e = open(s.path());
        let img = e.create_image(&n("keep"), None).unwrap();
        let m = e.mount(img.id).unwrap();
        write_file(m.root(), "f", b"persist");
        e.snapshot(img.id, &n("s")).unwrap();
    }
    assert!(
        wait_no_loops(s.path()).is_empty(),
        "closing the pool must detach every loop device"
    );
    let e = open(s.path());
    let r = e.resolve(&Target::parse("keep").unwrap()).unwrap();
    assert_eq!(r.state, DeviceState::Ready);
    let m = e.mount(r.id).unwrap();
    assert_eq!(read_file(m.root(), "f").unwrap(), b"persist");
    let sr = e.resolve(&Target::parse("keep@s").unwrap()).unwrap();
    let sm = e.mount(sr.id).unwrap();
    assert_eq!(read_file(sm.root(), "f").unwrap(), b"persist");
    // A second opener of the same state directory is refused.
    assert!(matches!(
        thinfs::engine::Engine::open_pool(&opts(s.path())),
        Err(Error::Busy(_))
    ));
}

fn child(state: &std::path::Path, failpoint: Option<&str>, args: &[&str]) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/crash_child");
    let mut c = Command::new(&bin);
    c.arg(state.join("state")).args(args);
    match failpoint {
        Some(f) => c.env("THINFS_FAILPOINT", f),
        None => c.env_remove("THINFS_FAILPOINT"),
    };
    c.output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
}

fn killed(o: &std::process::Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    o.status.signal() == Some(libc::SIGKILL)
}

/// Every device either complete with its record or gone; no orphan files.
fn check_consistent(e: &thinfs::engine::Engine) {
    let recs = e.records().unwrap();
    for r in &recs {
        assert_eq!(r.state, DeviceState::Ready, "after recovery: {r:?}");
        assert!(
            e.backend().exists(r.dev).unwrap(),
            "record without device: {r:?}"
        );
        assert!(e.mount(r.id).is_ok(), "device must mount: {r:?}");
        e.unmount(r.id);
    }
    let mut devs: Vec<u32> = recs.iter().map(|r| r.dev.get()).collect();
    devs.sort();
    let mut backend: Vec<u32> = e
        .backend()
        .list()
        .unwrap()
        .iter()
        .map(|d| d.get())
        .collect();
    backend.sort();
    if on_dm() {
        // dm-thin cannot list its devices: probe every id the test could
        // have used; only the recorded ones may exist.
        for id in 1..=24u32 {
            let exists = e
                .backend()
                .exists(thinfs::types::DeviceId::new(id).unwrap())
                .unwrap();
            assert_eq!(
                exists,
                devs.contains(&id),
                "thin id {id}: exists {exists}, records {devs:?}"
            );
        }
    } else {
        assert_eq!(devs, backend, "backend devices must match the records");
    }
    assert!(e.gc_pending().unwrap().is_empty());
}

#[test]
fn root_crash_at_every_step_recovers() {
    let cases: &[(&str, &[&str], bool)] = &[
        ("create.intent", &["create", "new"], false),
        ("create.backend", &["create", "new"], false),
        ("create.mkfs", &["create", "new"], false),
        ("create.done", &["create", "new"], true),
        ("snapshot.intent", &["snapshot", "base", "s9"], false),
        ("snapshot.frozen", &["snapshot", "base", "s9"], false),
        ("snapshot.backend", &["snapshot", "base", "s9"], false),
        ("snapshot.done", &["snapshot", "base", "s9"], true),
        ("clone.intent", &["clone", "base@s1", "cl"], false),
        ("clone.backend", &["clone", "base@s1", "cl"], false),
        ("destroy.intent", &["destroy", "base@s1"], true),
        ("destroy.backend", &["destroy", "base@s1"], true),
        ("rollback.intent", &["rollback", "base@s1"], false),
        ("rollback.backend", &["rollback", "base@s1"], false),
        ("rollback.swap", &["rollback", "base@s1"], true),
    ];
    for (fp, args, done) in cases {
        let s = Scratch::new("crash");
        {
            let e = open(s.path());
            let img = e.create_image(&n("base"), None).unwrap();
            let m = e.mount(img.id).unwrap();
            write_file(m.root(), "f", b"v1");
            e.snapshot(img.id, &n("s1")).unwrap();
            write_file(m.root(), "f", b"v2");
        }
        let o = child(s.path(), Some(fp), args);
        assert!(
            killed(&o),
            "{fp}: child must die at the failpoint: {:?} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        // A kill while the origin is frozen leaves the frozen filesystem (and
        // the devices under it) alive until the next open thaws it; any other
        // kill leaves nothing at all.
        // On dm-thin, device-mapper devices outlive the process by design
        // (the next open tears them down; checked after the reopen below).
        if *fp != "snapshot.frozen" && !on_dm() {
            assert!(
                wait_no_loops(s.path()).is_empty(),
                "{fp}: the killed process left loop devices"
            );
        }
        let e = open(s.path());
        check_consistent(&e);
        let exists = |t: &str| e.resolve(&Target::parse(t).unwrap()).is_ok();
        match args[0] {
            "create" => assert_eq!(exists("new"), *done, "{fp}"),
            "snapshot" => assert_eq!(exists("base@s9"), *done, "{fp}"),
            "clone" => assert_eq!(exists("cl"), *done, "{fp}"),
            "destroy" => assert_eq!(exists("base@s1"), !*done, "{fp}"),
            _ => {}
        }
        let img = e.resolve(&Target::parse("base").unwrap()).unwrap();
        let m = e.mount(img.id).unwrap();
        let want: &[u8] = if args[0] == "rollback" && *done {
            b"v1"
        } else {
            b"v2"
        };
        assert_eq!(
            read_file(m.root(), "f").unwrap(),
            want,
            "{fp}: image content"
        );
        drop(m);
        // Ids are reusable and the pool works: create and snapshot again.
        let again = e.create_image(&n("again"), None).unwrap();
        e.snapshot(again.id, &n("ok")).unwrap();
        drop(e);
        assert!(wait_no_loops(s.path()).is_empty());
    }
}

/// One live mount per device under concurrency (both backends): writers
/// that fsync through a mount they hold, an idle pass that lets go of
/// every mount every few milliseconds, readers, snapshots checked to hold
/// everything fsync'd before them, rollbacks (with and without
/// `destroy_newer`), fsck and destroys, for a bounded time. The census of
/// live superblocks never sees a device mounted twice.
#[test]
fn root_one_live_mount_per_device_under_stress() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    let secs: u64 = std::env::var("THINFS_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let s = Scratch::new("mstress");
    let e = Arc::new(open(s.path()));
    let work = e.create_image(&n("work"), None).unwrap();
    let rb = e.create_image(&n("rb"), None).unwrap();
    write_file(e.mount(rb.id).unwrap().root(), "marker", b"base");
    e.snapshot(rb.id, &n("base")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // If the test panics, the threads stop too (they hold the engine).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_on_panic = StopOnDrop(stop.clone());
    let ops = Arc::new(AtomicUsize::new(0));
    type Synced = Vec<(String, Vec<u8>)>;
    let synced: Arc<parking_lot::Mutex<Synced>> = Default::default();
    let mut threads = Vec::new();
    {
        let (e, stop, ops, synced) = (e.clone(), stop.clone(), ops.clone(), synced.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Hold the mount across several writes, as a cached inode would.
                let m = e.mount(work.id).unwrap();
                for _ in 0..3 {
                    let name = format!("f{i}");
                    let data = pattern(2048 + (i as usize % 5) * 999, i);
                    write_file(m.root(), &name, &data);
                    synced.lock().push((name, data));
                    i += 1;
                    ops.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }));
    }
    {
        let (e, stop, ops) = (e.clone(), stop.clone(), ops.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                e.unmount(work.id);
                e.unmount(rb.id);
                ops.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(3));
            }
        }));
    }
    {
        let (e, stop, ops) = (e.clone(), stop.clone(), ops.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = e.mount(rb.id) {
                    let _ = read_file(m.root(), "marker");
                }
                ops.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut snaps, mut rollbacks) = (0, 0);
    let mut step = 0u64;
    while Instant::now() < deadline {
        step += 1;
        match step % 5 {
            0 | 1 => {
                let before = synced.lock().clone();
                let name = format!("s{snaps}");
                let snap = e.snapshot(work.id, &n(&name)).unwrap();
                snaps += 1;
                {
                    let m = e.mount(snap.id).unwrap();
                    for (f, data) in before.iter().rev().take(10) {
                        let got = read_file(m.root(), f)
                            .unwrap_or_else(|x| panic!("snapshot {name} lacks fsync'd {f}: {x}"));
                        assert_eq!(&got, data, "snapshot {name}: {f}");
                    }
                }
                if snaps > 2 {
                    e.destroy(
                        &Target::parse(&format!("work@s{}", snaps - 3)).unwrap(),
                        false,
                    )
                    .unwrap();
                }
            }
            2 => {
                write_file(e.mount(rb.id).unwrap().root(), "marker", b"changed");
                e.snapshot(rb.id, &n("newer")).unwrap();
                e.rollback(&Target::parse("rb@base").unwrap(), true)
                    .unwrap();
                rollbacks += 1;
                assert_eq!(
                    read_file(e.mount(rb.id).unwrap().root(), "marker").unwrap(),
                    b"base"
                );
            }
            3 => {
                let (code, _) = e.fsck(&Target::parse("rb").unwrap()).unwrap();
                assert_eq!(code, 0, "rb checks clean");
            }
            _ => {
                write_file(e.mount(rb.id).unwrap().root(), "marker", b"changed");
                e.rollback(&Target::parse("rb@base").unwrap(), false)
                    .unwrap();
                rollbacks += 1;
            }
        }
        assert!(e.mount_census().1 <= 1, "a device was mounted twice");
        ops.fetch_add(1, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let all = synced.lock().clone();
    {
        let m = e.mount(work.id).unwrap();
        for (f, data) in &all {
            assert_eq!(&read_file(m.root(), f).unwrap(), data, "{f}");
        }
    }
    assert_eq!(e.mount_census().1, 1, "never two live mounts of one device");
    for t in ["work", "rb"] {
        let (code, out) = e.fsck(&Target::parse(t).unwrap()).unwrap();
        assert_eq!(code, 0, "{t}: {out}");
    }
    println!(
        "engine stress: {} operations ({} files fsync'd, {snaps} snapshots, {rollbacks} rollbacks) in {secs} s",
        ops.load(Ordering::Relaxed),
        all.len()
    );
}

#[test]
fn root_fsynced_data_survives_kill() {
    let s = Scratch::new("fsync");
    {
        let e = open(s.path());
        e.create_image(&n("base"), None).unwrap();
    }
    let o = child(
        s.path(),
        None,
        &["write", "base", "durable.txt", "committed"],
    );
    assert!(killed(&o), "{:?}", o);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "fsynced");
    if !on_dm() {
        assert!(wait_no_loops(s.path()).is_empty());
    }
    let e = open(s.path());
    let img = e.resolve(&Target::parse("base").unwrap()).unwrap();
    let m = e.mount(img.id).unwrap();
    assert_eq!(read_file(m.root(), "durable.txt").unwrap(), b"committed");
}

// ---- dm-thin only: run in the QEMU guest by scripts/dm-test ----

fn dm_opts(s: &Scratch, data: Bytes) -> thinfs::engine::PoolOptions {
    let mut o = opts(s.path());
    o.backend = thinfs::engine::BackendChoice::Dm;
    o.pool_size = data;
    o
}

#[test]
#[ignore = "needs dm-thin: scripts/dm-test runs it in a QEMU guest"]
fn dm_thousand_snapshots_and_metadata_returns() {
    let s = Scratch::new("dm1000");
    let e = thinfs::engine::Engine::open_pool(&dm_opts(&s, Bytes(2 << 30))).unwrap();
    let img = e.create_image(&n("base"), None).unwrap();
    let m = e.mount(img.id).unwrap();
    write_file(m.root(), "f", &pattern(8 << 20, 3));
    drop(m);
    let meta0 = e
        .pool_info()
        .unwrap()
        .status
        .meta_used
        .expect("dm reports metadata");
    let t = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..1000 {
        ids.push(e.snapshot(img.id, &n(&format!("s{i}"))).unwrap().id);
    }
    let took = t.elapsed();
    let meta1 = e.pool_info().unwrap().status.meta_used.unwrap();
    println!(
        "dm: 1000 snapshots in {:.1} s; metadata used {meta0} -> {meta1} bytes",
        took.as_secs_f64()
    );
    assert!(meta1 > meta0, "snapshots must use metadata");
    let sm = e.mount(ids[500]).unwrap();
    assert_eq!(read_file(sm.root(), "f").unwrap(), pattern(8 << 20, 3));
    drop(sm);
    e.unmount(ids[500]);
    for i in 0..1000 {
        e.destroy(&Target::parse(&format!("base@s{i}")).unwrap(), false)
            .unwrap();
    }
    // The pool's transaction id follows sled's.
    assert_eq!(
        e.backend().transaction_id().unwrap(),
        Some(e.pool_info().unwrap().transaction_id),
        "dm-thin transaction id must be in step with the metadata"
    );
    let meta2 = e.pool_info().unwrap().status.meta_used.unwrap();
    println!("dm: after destroying them, metadata used {meta2} bytes");
    assert!(
        meta2 <= meta0 + (64 << 10),
        "metadata must return to its start: {meta0} -> {meta2}"
    );
}

#[test]
#[ignore = "needs dm-thin: scripts/dm-test runs it in a QEMU guest"]
fn dm_out_of_space_gives_enospc_and_fs_survives() {
    let s = Scratch::new("dmfull");
    let e = thinfs::engine::Engine::open_pool(&dm_opts(&s, Bytes(256 << 20))).unwrap();
    let filler = e.create_image(&n("filler"), None).unwrap();
    let img = e.create_image(&n("big"), None).unwrap();
    {
        let fm = e.mount(filler.id).unwrap();
        write_file(fm.root(), "ballast", &pattern(64 << 20, 1));
    }
    e.unmount(filler.id);
    let m = e.mount(img.id).unwrap();
    write_file(m.root(), "keep", b"fsynced before the pool filled");
    // Fill the pool: the writer must get an error (ENOSPC or EIO), not hang.
    let fd = thinfs::sys::file::openat(
        m.root(),
        "fill".as_ref(),
        libc::O_WRONLY | libc::O_CREAT,
        0o644,
    )
    .unwrap();
    let mut f = std::fs::File::from(fd);
    let chunk = pattern(4 << 20, 2);
    let mut err = None;
    for _ in 0..128 {
        use std::io::Write;
        if let Err(x) = f.write_all(&chunk).and_then(|_| f.sync_data()) {
            err = Some(x);
            break;
        }
    }
    let err = err.expect("filling a 256M pool with 512M must fail");
    println!("dm: writer got {err} when the pool filled");
    // dm-thin fails the bio with "no space"; ext4 reports it as EIO or ENOSPC.
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EIO)),
        "{err}"
    );
    drop(f);
    let st = e.pool_info().unwrap().status;
    println!(
        "dm: pool at {} of {} bytes; {}",
        st.used, st.total, st.detail
    );
    // New devices are refused below the reserve.
    assert!(matches!(
        e.create_image(&n("more"), None),
        Err(thinfs::error::Error::NoSpace(_))
    ));
    drop(m);
    e.unmount(img.id);
    e.wait_released(img.id, HANG).unwrap();
    // Free space, then the filesystem must check clean.
    e.destroy(&Target::parse("filler").unwrap(), false).unwrap();
    // A write that needed a new block in a full pool may have aborted the
    // ext4 journal (after a snapshot even journal blocks are copy-on-write),
    // so the filesystem may be marked for a check. Once space is free,
    // e2fsck's automatic repair (journal replay, clearing the error flag)
    // must be all it takes: exit 0 or 1, then a second, read-only check
    // must find it clean.
    let (repair, text) = e
        .fsck(&Target::parse("big").unwrap())
        .expect("thinfs fsck repairs it");
    println!(
        "dm: thinfs fsck: e2fsck -fy exit {repair}: {}",
        text.lines().last().unwrap_or("")
    );
    assert!(repair <= 1);
    let act = e.backend().activate(img.dev, img.size, false).unwrap();
    let fsck = |args: &[&str]| {
        let o = Command::new("e2fsck")
            .args(args)
            .arg(act.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        println!(
            "dm: e2fsck {}: exit {:?}: {}",
            args.join(" "),
            o.status.code(),
            text.lines().last().unwrap_or("")
        );
        (o.status.code().unwrap_or(8), text)
    };
    let (check, text) = fsck(&["-fn"]);
    assert_eq!(check, 0, "filesystem not clean after repair: {text}");
    drop(act);
    // The engine keeps serving: the fsynced file is there, new images work.
    // Deleting the big file gives its blocks back (ext4 discard -> dm-thin).
    let m = e.mount(img.id).unwrap();
    assert_eq!(
        read_file(m.root(), "keep").unwrap(),
        b"fsynced before the pool filled"
    );
    thinfs::sys::file::unlinkat(m.root(), "fill".as_ref(), false).unwrap();
    thinfs::sys::fsio::syncfs(m.root()).unwrap();
    let _ = thinfs::sys::fsio::fitrim(m.root());
    drop(m);
    let st = e.pool_info().unwrap().status;
    println!(
        "dm: after deleting the file, pool at {} of {} bytes",
        st.used, st.total
    );
    e.create_image(&n("after"), None).unwrap();
}

#[test]
#[ignore = "needs dm-thin: scripts/dm-test runs it in a QEMU guest"]
fn dm_snapshot_time_does_not_grow_with_data() {
    let mut lines = Vec::new();
    for backend in [
        thinfs::engine::BackendChoice::Dm,
        thinfs::engine::BackendChoice::Reflink,
    ] {
        let s = Scratch::new("dmlat");
        let mut o = dm_opts(&s, Bytes(4 << 30));
        o.backend = backend;
        let e = thinfs::engine::Engine::open_pool(&o).unwrap();
        let img = e.create_image(&n("base"), Some(Bytes(4 << 30))).unwrap();
        let m = e.mount(img.id).unwrap();
        let mut med = Vec::new();
        for (label, mb) in [("64M", 64usize), ("1G", 960)] {
            write_file(m.root(), &format!("d{mb}"), &pattern(mb << 20, mb as u64));
            let mut lat = Vec::new();
            for i in 0..9 {
                let t = std::time::Instant::now();
                let r = e.snapshot(img.id, &n(&format!("{label}-{i}"))).unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                e.destroy_id(r.id).unwrap();
            }
            lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
            med.push(lat[4]);
            lines.push(format!("{backend:?} {label}: p50 {:.1} ms", lat[4]));
        }
        lines.push(format!("{backend:?} ratio 1G/64M: {:.2}", med[1] / med[0]));
        assert!(
            med[1] < med[0] * 10.0 + 20.0,
            "{backend:?} snapshot time grew with data: {med:?}"
        );
    }
    for l in lines {
        println!("dm-latency: {l}");
    }
}

/// One engine per state directory: a second open is refused (after a short
/// wait), and a lock released within that wait is taken. The wait covers a
/// daemon that has just exited and a copy of the lock's descriptor in a
/// process forked by another thread that has not reached exec yet (the
/// crash test, run beside others, saw "in use by another thinfs").
#[test]
fn root_state_directory_lock_is_exclusive_and_waits_briefly() {
    let s = Scratch::new("lock");
    let e = open(s.path());
    let t = std::time::Instant::now();
    let err = thinfs::engine::Engine::open_pool(&opts(s.path()))
        .err()
        .expect("a second engine on the same state directory must be refused");
    assert!(matches!(err, Error::Busy(_)), "{err}");
    assert!(
        err.to_string().contains("in use by another thinfs"),
        "{err}"
    );
    assert!(
        t.elapsed() >= std::time::Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(e);
    });
    let e2 = thinfs::engine::Engine::open_pool(&opts(s.path()))
        .expect("a lock released within the wait is taken");
    holder.join().unwrap();
    drop(e2);
}
