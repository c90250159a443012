//! send/receive across backends: a reflink pool sends to a dm-thin pool and
//! the dm-thin pool sends back, full and incremental, and every tree
//! matches. Needs device-mapper: `scripts/dm-test` runs it in a QEMU guest
//! (it is ignored elsewhere).

mod common;

use common::stream::*;
use common::*;
use thinfs::engine::{Engine, Target};
use thinfs::types::Bytes;

fn open_on(scratch: &Scratch, backend: &str) -> Engine {
    let mut o = opts(scratch.path());
    o.backend = backend.parse().expect("backend");
    o.pool_size = Bytes(2 << 30);
    Engine::open_pool(&o).expect("open pool")
}

fn change(e: &Engine, image: &str, seed: u64) {
    let id = snap(e, image).id;
    let m = e.mount(id).unwrap();
    let root = proc_path(m.root());
    std::fs::write(
        root.join(format!("changed-{seed}.bin")),
        pattern(1 << 20, seed),
    )
    .unwrap();
    std::fs::write(root.join("dir/a.bin"), pattern(2 << 20, seed)).unwrap();
    thinfs::sys::fsio::syncfs(m.root()).unwrap();
}

#[test]
#[ignore = "needs device-mapper: scripts/dm-test runs it in a QEMU guest"]
fn dm_stream_reflink_to_dm_and_back() {
    let (sr, sd, sr2) = (
        Scratch::new("xrefl"),
        Scratch::new("xdm"),
        Scratch::new("xrefl2"),
    );
    let (r, d) = (open_on(&sr, "reflink"), open_on(&sd, "dm"));
    assert_eq!(r.backend().kind(), "reflink");
    assert_eq!(d.backend().kind(), "dm");
    let img = r.create_image(&n("src"), Some(Bytes(128 << 20))).unwrap();
    {
        let m = r.mount(img.id).unwrap();
        populate(&proc_path(m.root()));
        thinfs::sys::fsio::syncfs(m.root()).unwrap();
    }
    r.snapshot(img.id, &n("s1")).unwrap();

    // reflink -> dm: full, then incremental.
    receive(&d, "copy", false, &send(&r, "src@s1", None)).unwrap();
    assert_same_tree(&r, "src@s1", &d, "copy@s1");
    change(&r, "src", 2);
    r.snapshot(img.id, &n("s2")).unwrap();
    let inc = send(&r, "src@s2", Some("src@s1"));
    assert!(
        inc.len() < 6 << 20,
        "reflink incremental: {} bytes",
        inc.len()
    );
    receive(&d, "copy", false, &inc).unwrap();
    assert_same_tree(&r, "src@s2", &d, "copy@s2");
    assert_same_tree(&r, "src@s2", &d, "copy");

    // dm -> reflink: the dm pool's snapshots go to a fresh reflink pool,
    // and a change made on dm comes back incrementally.
    let r2 = open_on(&sr2, "reflink");
    receive(&r2, "back", false, &send(&d, "copy@s1", None)).unwrap();
    receive(&r2, "back", false, &send(&d, "copy@s2", Some("copy@s1"))).unwrap();
    assert_same_tree(&r, "src@s2", &r2, "back@s2");
    let copy = snap(&d, "copy").id;
    change(&d, "copy", 3);
    d.unmount(copy);
    d.snapshot(copy, &n("s3")).unwrap();
    let inc = send(&d, "copy@s3", Some("copy@s2"));
    receive(&r2, "back", false, &inc).unwrap();
    assert_same_tree(&d, "copy@s3", &r2, "back@s3");
    for (e, t) in [(&d, "copy@s2"), (&r2, "back@s3"), (&r2, "back")] {
        let (code, out) = e.fsck(&Target::parse(t).unwrap()).unwrap();
        assert_eq!(code, 0, "fsck {t}: {out}");
    }
    eprintln!(
        "dm-stream: reflink->dm and dm->reflink round trips identical; dm incremental {} bytes",
        inc.len()
    );
}
