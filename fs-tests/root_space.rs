//! A full pool gives writers ENOSPC at `write()` time, never lost data or
//! an aborted journal (issue 11). Through the real FUSE mount and daemon
//! (its space guard), on a 2G reflink pool holding 10G images.
mod common;

use common::*;
use serde_json::Value;
use std::fs::File;
use std::io::{Read, Write};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thinfs::engine::{BackendChoice, Engine, PoolOptions, Target};
use thinfs::types::Bytes;

const FILE: usize = 32 << 20;
const CHUNK: usize = 1 << 20;

/// A daemon on a fresh 2G pool with two 10G images `a` and `b`. TestMount
/// makes an 8G pool and clap refuses a second `--pool-size`; an existing
/// pool keeps its size, so the pool is made again, smaller, in between.
fn small_pool(tag: &str) -> TestMount {
    let mut m = TestMount::start(tag);
    m.stop();
    assert!(wait_no_loops(m.scratch.path()).is_empty());
    std::fs::remove_dir_all(&m.state).unwrap();
    let mut o = PoolOptions::new(&m.state);
    o.backend = BackendChoice::Reflink;
    o.pool_size = Bytes(2 << 30);
    o.reserve = Some(Bytes(64 << 20));
    o.default_image_size = Bytes(10 << 30);
    drop(Engine::open_pool(&o).expect("make a 2G pool"));
    m.spawn();
    let p = pool(&m);
    assert!(
        p["total"].as_u64().unwrap() < 3 << 30,
        "the pool must be a 2G XFS pool file, not the host filesystem: {p}"
    );
    for n in ["a", "b"] {
        create(&m, n);
    }
    m
}

fn create(m: &TestMount, name: &str) {
    let o = m.cli(&["create", name, "--size", "10G"]);
    assert!(o.status.success(), "create {name}: {o:?}");
}

fn pool(m: &TestMount) -> Value {
    let o = m.cli(&["pool", "--json"]);
    assert!(o.status.success(), "thinfs pool --json: {o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

fn state(m: &TestMount) -> String {
    pool(m)["state"].as_str().unwrap().to_string()
}

/// Wait (up to `secs`) until the pool state is one of `want`.
fn wait_state(m: &TestMount, want: &[&str], secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = state(m);
        if want.contains(&s.as_str()) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 1 MiB of data for chunk `chunk` of file `fid`: every 4 KiB block says
/// where it belongs, so lost or misplaced blocks cannot read back right.
fn chunk_data(base: &[u8], fid: u32, chunk: u32) -> Vec<u8> {
    let mut v = base.to_vec();
    for (i, b) in v.chunks_mut(4096).enumerate() {
        b[..4].copy_from_slice(&fid.to_le_bytes());
        b[4..8].copy_from_slice(&chunk.to_le_bytes());
        b[8..12].copy_from_slice(&(i as u32).to_le_bytes());
    }
    v
}

/// A file written, and how many of its bytes `write()` accepted.
#[derive(Debug, Clone)]
struct Written {
    path: PathBuf,
    fid: u32,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Fill {
    files: Vec<Written>,
    /// Every error any call returned: (call, errno).
    errors: Vec<(&'static str, i32)>,
    bytes: u64,
    secs: f64,
}

impl Fill {
    fn enospc_writes(&self) -> usize {
        self.errors
            .iter()
            .filter(|e| **e == ("write", libc::ENOSPC))
            .count()
    }
    fn others(&self) -> Vec<(&'static str, i32)> {
        self.errors
            .iter()
            .filter(|e| **e != ("write", libc::ENOSPC))
            .copied()
            .collect()
    }
}

/// Write 32 MiB files in `dir` at full speed until a write fails.
/// `snapshot_after`: take a snapshot of `image` by mkdir after that many files.
fn fill(
    dir: &Path,
    prefix: &str,
    first_fid: u32,
    fsync: bool,
    max_files: u32,
    snapshot_after: Option<(u32, PathBuf)>,
) -> Fill {
    let base = pattern(CHUNK, first_fid as u64);
    let mut out = Fill::default();
    let t = Instant::now();
    'files: for n in 0..max_files {
        if let Some((at, snap)) = &snapshot_after
            && *at == n
        {
            std::fs::create_dir(snap).expect("snapshot mid-fill");
        }
        let fid = first_fid + n;
        let path = dir.join(format!("{prefix}{n:03}"));
        let mut f = match File::create(&path) {
            Ok(f) => f,
            Err(e) => {
                out.errors.push(("create", errno(&e)));
                break;
            }
        };
        let mut w = Written {
            path,
            fid,
            bytes: 0,
        };
        for c in 0..(FILE / CHUNK) as u32 {
            let buf = chunk_data(&base, fid, c);
            let mut off = 0;
            while off < buf.len() {
                match f.write(&buf[off..]) {
                    Ok(0) => unreachable!("write returned 0"),
                    Ok(k) => {
                        off += k;
                        w.bytes += k;
                        out.bytes += k as u64;
                    }
                    Err(e) => {
                        out.errors.push(("write", errno(&e)));
                        out.files.push(w);
                        break 'files;
                    }
                }
            }
        }
        if fsync && let Err(e) = f.sync_all() {
            out.errors.push(("fsync", errno(&e)));
            out.files.push(w);
            break;
        }
        out.files.push(w);
    }
    out.secs = t.elapsed().as_secs_f64();
    out
}

/// Keep writing 1 MiB chunks (ENOSPC expected) in every dir until the
/// pool says `full`: the last writers take what the guard still gives.
fn top_up(m: &TestMount, dirs: &[&Path], first_fid: u32) -> Fill {
    let mut out = Fill::default();
    let mut files: Vec<(File, Written, Vec<u8>)> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let fid = first_fid + i as u32;
            let base = pattern(CHUNK, first_fid as u64);
            let path = d.join("topup");
            (
                File::create(&path).unwrap(),
                Written {
                    path,
                    fid,
                    bytes: 0,
                },
                base,
            )
        })
        .collect();
    // The deadline only ends a hang: a busy machine fills slowly.
    let deadline = Instant::now() + HANG;
    let mut c = 0u32;
    while Instant::now() < deadline {
        let mut refused = 0;
        for (f, w, base) in files.iter_mut() {
            // Whole chunks only, so the file is a whole number of chunks.
            let buf = chunk_data(base, w.fid, (w.bytes / CHUNK) as u32);
            match f.write(&buf) {
                Ok(k) if k == buf.len() => {
                    w.bytes += k;
                    out.bytes += k as u64;
                }
                Ok(_) => {
                    // A short write: the rest would get ENOSPC; keep the
                    // file whole-chunked by cutting it back.
                    f.set_len(w.bytes as u64).unwrap();
                    f.seek(SeekFrom::Start(w.bytes as u64)).unwrap();
                    refused += 1;
                }
                Err(e) => {
                    out.errors.push(("write", errno(&e)));
                    refused += 1;
                }
            }
        }
        c += 1;
        if refused == files.len() || c.is_multiple_of(16) {
            if state(m) == "full" {
                break;
            }
            if refused == files.len() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for (f, w, _) in files {
        drop(f);
        out.files.push(w);
    }
    out
}

fn sync() {
    assert!(
        std::process::Command::new("sync")
            .status()
            .unwrap()
            .success()
    );
}

fn drop_caches() {
    sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
}

/// Every byte `write()` accepted reads back as written.
fn verify(files: &[Written]) {
    for w in files {
        let mut got = Vec::new();
        File::open(&w.path)
            .and_then(|mut f| f.read_to_end(&mut got))
            .unwrap_or_else(|e| panic!("read {}: {e}", w.path.display()));
        assert!(
            got.len() >= w.bytes,
            "{}: {} bytes written, {} read back",
            w.path.display(),
            w.bytes,
            got.len()
        );
        let base = pattern(CHUNK, (w.fid - w.fid % 1000) as u64);
        let mut bad = 0;
        for (c, have) in got[..w.bytes].chunks(CHUNK).enumerate() {
            let want = chunk_data(&base, w.fid, c as u32);
            if have != &want[..have.len()] {
                bad += 1;
            }
        }
        assert_eq!(
            bad,
            0,
            "{}: {bad} MiB chunks of {} read back wrong",
            w.path.display(),
            w.bytes / CHUNK
        );
    }
}

/// The kernel log from now on, drained by a background thread so that a
/// busy machine (other tests mounting and unmounting) cannot overwrite
/// records in the ring buffer before we read them.
struct Kmsg {
    records: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
    lost: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kmsg {
    fn open() -> Kmsg {
        use std::sync::atomic::Ordering;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .expect("open /dev/kmsg");
        f.seek(SeekFrom::End(0)).expect("seek /dev/kmsg to its end");
        let records: std::sync::Arc<parking_lot::Mutex<Vec<String>>> = Default::default();
        let lost: std::sync::Arc<std::sync::atomic::AtomicUsize> = Default::default();
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let (r, l, st) = (records.clone(), lost.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => {}
                    Ok(k) => {
                        let rec = String::from_utf8_lossy(&buf[..k]).into_owned();
                        let msg = rec.split_once(';').map(|x| x.1).unwrap_or(&rec);
                        r.lock().push(msg.trim().to_string());
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                        l.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(_) => {}
                }
                // Nothing to read now: stop if asked (everything up to here
                // has been read), else wait a little.
                if st.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        Kmsg {
            records,
            lost,
            stop,
            thread: Some(thread),
        }
    }

    /// Records since `open` that speak of one of `devs` (e.g. "loop7").
    fn about(&mut self, devs: &[String]) -> Vec<String> {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("kmsg reader");
        }
        let lost = self.lost.load(Ordering::Relaxed);
        assert_eq!(
            lost, 0,
            "the kernel log overwrote {lost} record(s) before we read them"
        );
        self.records
            .lock()
            .iter()
            .filter(|msg| {
                devs.iter().any(|d| {
                    msg.match_indices(d.as_str())
                        .any(|(i, _)| !msg[i + d.len()..].starts_with(|c: char| c.is_ascii_digit()))
                })
            })
            .cloned()
            .collect()
    }
}

impl Drop for Kmsg {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Names (loopN) of the loop devices of the images in this pool.
fn image_loops(m: &TestMount) -> Vec<String> {
    let pool_file = m.state.join("pool.img").to_string_lossy().into_owned();
    let all = thinfs::sys::loopdev::attached();
    let Some(p) = all.iter().find(|l| l.backing_file == pool_file) else {
        return vec![];
    };
    all.iter()
        .filter(|l| l.backing_dev == p.own_dev)
        .filter_map(|l| l.path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

fn bad_kernel_lines(lines: &[String]) -> Vec<String> {
    const BAD: &[&str] = &[
        "data loss",
        "I/O error",
        "error",
        "Aborting journal",
        "aborted",
        "read-only",
        "failed",
    ];
    lines
        .iter()
        .filter(|l| {
            BAD.iter()
                .any(|b| l.to_lowercase().contains(&b.to_lowercase()))
        })
        .cloned()
        .collect()
}

/// Stop the daemon and `e2fsck -fn` every target: must be clean.
fn fsck_clean(m: &mut TestMount, targets: &[&str]) {
    m.stop();
    let mut o = PoolOptions::new(&m.state);
    o.backend = BackendChoice::Reflink;
    let e = Engine::open_pool(&o).expect("reopen the pool");
    for t in targets {
        let r = e.resolve(&Target::parse(t).unwrap()).unwrap();
        let act = e.backend().activate(r.dev, r.size, true).unwrap();
        let out = std::process::Command::new("e2fsck")
            .arg("-fn")
            .arg(act.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "e2fsck -fn {t}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn report(what: &str, f: &Fill) {
    println!(
        "{what}: {} MiB in {:.1} s ({:.0} MiB/s), {} files, errors {:?}",
        f.bytes >> 20,
        f.secs,
        (f.bytes >> 20) as f64 / f.secs.max(1e-3),
        f.files.len(),
        f.errors
    );
}

/// Two writers (one with fsync, one without) fill the pool; a snapshot
/// of `a` may be taken mid-fill. Checks everything the issue asks for.
/// The full-pool runs write at full speed and time the guard: one at a
/// time, so that two of them do not share the disk and the CPU.
static FULL_POOL_RUNS: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn full_pool(tag: &str, snapshot: bool) {
    let _one_at_a_time = FULL_POOL_RUNS.lock();
    let mut m = small_pool(tag);
    let mut kmsg = Kmsg::open();
    assert_eq!(state(&m), "ok");
    let overcommit = pool(&m)["overcommit"].as_f64().unwrap();
    assert!(overcommit > 9.0, "20G of images on a 2G pool: {overcommit}");
    let (da, db) = (m.path("a"), m.path("b"));
    let snap = m.path("a/.snapshots/mid");
    let (fa, fb) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            fill(
                &da,
                "f",
                1000,
                true,
                64,
                snapshot.then(|| (4, snap.clone())),
            )
        });
        let b = s.spawn(|| fill(&db, "f", 2000, false, 64, None));
        (a.join().unwrap(), b.join().unwrap())
    });
    report("a (fsync)", &fa);
    report("b (no fsync)", &fb);
    let mut loops = image_loops(&m);
    // Both stopped on ENOSPC from write(), nothing else failed.
    for (n, f) in [("a", &fa), ("b", &fb)] {
        assert_eq!(
            f.others(),
            vec![],
            "{n}: errors other than ENOSPC from write()"
        );
        assert_eq!(f.enospc_writes(), 1, "{n}: the writer must end on ENOSPC");
    }
    let top = top_up(&m, &[&da, &db], 3000);
    println!(
        "top-up: {} MiB more, errors {:?}",
        top.bytes >> 20,
        top.errors
    );
    assert_eq!(top.others(), vec![]);
    let p = pool(&m);
    println!("full: {p}");
    assert_eq!(p["state"], "full", "{p}");
    // Nothing lost: every byte write() accepted reads back after the
    // caches are dropped (all dirty data has gone to the pool by then).
    drop_caches();
    verify(&fa.files);
    verify(&fb.files);
    verify(&top.files);
    if snapshot {
        verify(
            &fa.files[..4]
                .iter()
                .map(|w| Written {
                    path: snap.join(w.path.file_name().unwrap()),
                    ..w.clone()
                })
                .collect::<Vec<_>>(),
        );
    }
    let mut targets = vec!["a", "b"];
    if !snapshot {
        // A fresh image mounted on a full pool, written at once at full
        // speed. Its mount waits for the guard's first look, so nothing is
        // written into it unguarded (before: 43-60 MB of the 128 MiB
        // margin went in before the guard saw it).
        create(&m, "c");
        let dc = m.path("c");
        let fc = fill(&dc, "f", 4000, false, 32, None);
        report("c (fresh mount on a full pool)", &fc);
        // How much c had taken before the guard first saw it: an empty
        // ext4 (24 KiB in use here), not the writer's first megabytes.
        let info: Value = serde_json::from_slice(&m.cli(&["info", "c", "--json"]).stdout).unwrap();
        let key = format!("now guarding image id {} (", info["id"]);
        let log = m.log();
        let line = log
            .lines()
            .find(|l| l.contains(&key))
            .unwrap_or_else(|| panic!("no {key:?} in the log"));
        let unguarded: u64 = line
            .split("): ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        println!("c: {unguarded} bytes in use when the guard first saw it");
        assert!(
            unguarded < 1 << 20,
            "written before the guard saw it: {line}"
        );
        loops.extend(image_loops(&m));
        assert_eq!(
            fc.others(),
            vec![],
            "c: errors other than ENOSPC from write()"
        );
        assert_eq!(fc.enospc_writes(), 1, "c: the writer must end on ENOSPC");
        drop_caches();
        verify(&fc.files);
        for w in &fc.files {
            std::fs::remove_file(&w.path).unwrap();
        }
        targets.push("c");
    } else {
        targets.push("a@mid");
    }
    // Free space in a; b writes again, no fsck in between.
    for w in fa.files.iter().chain(&top.files[..1]) {
        std::fs::remove_file(&w.path).unwrap();
    }
    // With a@mid holding a's first files, deleting a's frees only its later
    // ones, and whether that lifts the writers' budget over the full mark
    // depended on how far the fill went (CI: 60 MB, just below 64 MiB).
    // Without a snapshot, how much a wrote (fsync per file) against b
    // depends on the disk. b gives up all but its first files too (all were
    // verified above), so the pool surely has room in both variants.
    let kept_b = fb.files.len().min(4);
    for w in &fb.files[kept_b..] {
        std::fs::remove_file(&w.path).unwrap();
    }
    // Commit ext4's journals now: their discards give the blocks back.
    sync();
    let after = wait_state(&m, if snapshot { &["ok", "low"] } else { &["ok"] }, 120);
    println!("after deleting a's files: {}", pool(&m));
    if snapshot {
        assert_ne!(after, "full");
    } else {
        assert_eq!(after, "ok");
    }
    let again = fill(&db, "again", 5000, false, 2, None);
    report("b again", &again);
    assert_eq!(
        again.errors,
        vec![],
        "b must write again once a freed space"
    );
    drop_caches();
    verify(&again.files);
    verify(&fb.files[..kept_b]);
    let log = m.log();
    // "pool full" is logged once per episode: never twice without the pool
    // coming back ("pool no longer full") in between. The last fill can
    // bring a second, real episode, which is then logged again.
    let mut full = false;
    let mut episodes = 0;
    for l in log.lines() {
        if l.contains("pool full:") {
            assert!(!full, "\"pool full\" logged twice in one episode: {log}");
            full = true;
            episodes += 1;
        } else if l.contains("pool no longer full") {
            full = false;
        }
    }
    assert!(episodes >= 1, "the full pool was logged: {log}");
    assert!(log.matches("pool 80 % used").count() <= 1, "warned once");
    assert!(log.matches("pool 90 % used").count() <= 1, "warned once");
    loops.sort();
    loops.dedup();
    assert!(loops.len() >= 2, "image loop devices: {loops:?}");
    fsck_clean(&mut m, &targets);
    let lines = kmsg.about(&loops);
    // The filter must see the images' devices. ext4 rate-limits its mount
    // messages for the whole machine (other tests mount a lot just before),
    // so the loop devices' own attach lines and ext4's unmount lines count
    // as well (CI saw only the unmount lines of the images' devices).
    assert!(
        lines.iter().any(|l| l.contains("mounted filesystem")
            || l.contains("detected capacity change")
            || l.contains("unmounting filesystem")),
        "the kernel log filter must see the images' devices: {loops:?} {lines:?}"
    );
    let bad = bad_kernel_lines(&lines);
    assert!(
        bad.is_empty(),
        "kernel log for {loops:?}:\n{}",
        bad.join("\n")
    );
}

#[test]
fn full_pool_gives_enospc_at_write_and_loses_nothing() {
    full_pool("space", false);
}

#[test]
fn full_pool_with_snapshot_mid_fill() {
    full_pool("spacesnap", true);
}

/// Wait for an event, up to `secs`: the deadline only ends a hung daemon
/// (a loaded machine is many times slower than a quiet one).
fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// ext4 errors on an image (as a journal aborted by a failed write would
/// leave) are logged at once and repaired by e2fsck -fy once the image is
/// unmounted (here by idle expiry); the data stays.
#[test]
fn ext4_errors_are_logged_and_repaired_on_unmount() {
    let m = TestMount::start_with("spacerepair", &["--idle-secs", "1"]);
    std::fs::create_dir(m.path("r")).unwrap();
    // Committed before the error: with errors=remount-ro the error aborts
    // ext4's journal, and what it had not committed is gone (as it should).
    {
        let mut f = std::fs::File::create(m.path("r/x")).unwrap();
        std::io::Write::write_all(&mut f, b"kept").unwrap();
        f.sync_all().unwrap();
    }
    let loops = image_loops(&m);
    assert_eq!(loops.len(), 1, "{loops:?}");
    let sysfs = PathBuf::from("/sys/fs/ext4").join(&loops[0]);
    std::fs::write(sysfs.join("trigger_fs_error"), "thinfs test").unwrap();
    // ext4 counts it in its superblock a moment later.
    wait_for("errors_count 1", 120, || {
        std::fs::read_to_string(sysfs.join("errors_count"))
            .unwrap()
            .trim()
            == "1"
    });
    wait_for("the error to be logged", 120, || {
        m.log().contains("image r: ext4 reports 1 error(s)")
    });
    wait_for("the repair", 300, || {
        m.log()
            .contains("image r: repaired after ext4 errors: e2fsck -fy exit")
    });
    assert_eq!(std::fs::read(m.path("r/x")).unwrap(), b"kept");
    let loops = image_loops(&m);
    assert_eq!(loops.len(), 1, "{loops:?}");
    let errors = std::fs::read_to_string(
        PathBuf::from("/sys/fs/ext4")
            .join(&loops[0])
            .join("errors_count"),
    )
    .unwrap();
    assert_eq!(
        errors.trim(),
        "0",
        "remounted after the repair: no errors left"
    );
}
