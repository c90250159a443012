//! Snapshots of a fragmented image taken while it is written: on the
//! reflink backend most of the clone happens before the freeze (two
//! phases), and every snapshot must still be the image at one instant.
//!
//! The oracle is a log a writer keeps in the image: record `g` goes to
//! block `g % RECORDS`, is synced, and only then does the header (the
//! file's last block) say `g`. In any point-in-time copy, every record the
//! header counts is there. A copy made of ranges taken at different times
//! (the first phase alone) has a header newer than its records.
//!
//! Run as root: `cargo test --test root_snapshot_live -- --test-threads=1`.

mod common;

use common::TestMount;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const BLOCK: u64 = 4096;
/// Blocks of records; the header is the block after them.
const RECORDS: u64 = 2047;
/// Extents above which the reflink backend copies in two phases.
const TWO_PHASE_FROM: u64 = 1024;

fn block_of(g: u64) -> Vec<u8> {
    g.to_le_bytes().repeat((BLOCK / 8) as usize)
}

/// The generation a block holds (every u64 in it must agree).
fn gen_of(b: &[u8], what: &str) -> u64 {
    let g = u64::from_le_bytes(b[..8].try_into().unwrap());
    assert!(
        b.chunks(8).all(|c| c == &b[..8]),
        "{what}: a torn block (first word {g})"
    );
    g
}

fn extents(m: &TestMount, image: &str) -> u64 {
    let out = m.cli(&["info", image, "--json"]);
    assert!(out.status.success(), "thinfs info: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info --json");
    v["usage"]["extents"].as_u64().unwrap_or(0)
}

/// Scatter `n` synced 4 KiB overwrites over `f` (of `blocks` blocks).
fn scatter(f: &File, blocks: u64, n: u64) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.write_all_at(&block_of(i), (x % blocks) * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn root_snapshot_of_a_busy_fragmented_image_is_one_instant() {
    let m = TestMount::start("snap-live");
    fs::create_dir(m.path("img")).unwrap();
    // Fragment the image: 64 MiB written in order, a snapshot to share it,
    // then scattered overwrites (each splits the image file's extents).
    let data = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(m.path("img/data"))
        .unwrap();
    let blocks = (64 << 20) / BLOCK;
    data.write_all_at(&vec![7u8; 64 << 20], 0).unwrap();
    data.sync_all().unwrap();
    fs::create_dir(m.path("img/.snapshots/shared")).unwrap();
    scatter(&data, blocks, 3000);
    let ext = extents(&m, "img");
    let reflink = std::env::var("THINFS_TEST_BACKEND").as_deref() != Ok("dm");
    if reflink {
        assert!(
            ext > 2 * TWO_PHASE_FROM,
            "the image has only {ext} extents: the test would not reach the two-phase copy"
        );
    }

    // The log, allocated in full first so that its writes are overwrites.
    let log = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(m.path("img/log"))
        .unwrap();
    log.write_all_at(&vec![0u8; ((RECORDS + 1) * BLOCK) as usize], 0)
        .unwrap();
    log.sync_all().unwrap();
    let log = Arc::new(log);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (log, stop, written) = (log.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut g = 0u64;
            while !stop.load(Ordering::Relaxed) {
                g += 1;
                log.write_all_at(&block_of(g), (g % RECORDS) * BLOCK)
                    .unwrap();
                log.sync_data().unwrap();
                log.write_all_at(&block_of(g), RECORDS * BLOCK).unwrap();
                log.sync_data().unwrap();
                written.store(g, Ordering::Relaxed);
            }
        })
    };
    let mut headers = Vec::new();
    for k in 0..4 {
        // Let the writer run, and keep the image fragmented.
        while written.load(Ordering::Relaxed) < 50 * (k + 1) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let name = format!("img/.snapshots/live{k}");
        fs::create_dir(m.path(&name)).unwrap_or_else(|e| {
            panic!(
                "mkdir {name}: {e} (a copy that is not of one instant has a journal to \
                 replay and cannot be mounted read-only)"
            )
        });
        let snap = fs::read(m.path(&format!("{name}/log"))).unwrap();
        assert_eq!(snap.len() as u64, (RECORDS + 1) * BLOCK);
        let at = |b: u64| &snap[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        let h = gen_of(at(RECORDS), &format!("{name} header"));
        for g in h.saturating_sub(RECORDS - 1).max(1)..=h {
            let r = gen_of(at(g % RECORDS), &format!("{name} record {g}"));
            assert!(
                r >= g,
                "{name}: the header counts record {g}, but its block holds record {r}: \
                 not one instant (header {h}, writer at {})",
                written.load(Ordering::Relaxed)
            );
        }
        headers.push(h);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        headers.windows(2).all(|w| w[0] < w[1]),
        "the writer ran between snapshots: {headers:?}"
    );
    if reflink {
        let log = fs::read_to_string(m.log_path()).unwrap();
        let two_phase = log.matches("copied before the freeze").count();
        assert!(
            two_phase >= 4,
            "{two_phase} snapshot(s) took the two-phase copy ({ext} extents)"
        );
    }
}
