//! Issue 14: a backup made on a reflink pool, with several snapshots,
//! restored into a dm-thin pool: every snapshot and the head hold the same
//! files as the source. Drives the service (the daemon's rights and
//! steps) on two pools in one process. Needs device-mapper:
//! `scripts/dm-test` runs it in a QEMU guest (it is ignored elsewhere).

mod common;

use common::stream::*;
use common::*;
use std::sync::Arc;
use thinfs::engine::{Engine, Target};
use thinfs::service::{BackupRequest, Caller, Job, RestoreRequest, Service};
use thinfs::types::Bytes;

fn open_on(scratch: &Scratch, backend: &str) -> Arc<Engine> {
    let mut o = opts(scratch.path());
    o.backend = backend.parse().expect("backend");
    o.pool_size = Bytes(2 << 30);
    Arc::new(Engine::open_pool(&o).expect("open pool"))
}

fn root() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: std::process::id(),
        groups: Some(Arc::from(Vec::new())),
    }
}

/// A change of the image's head: a new file, a rewritten one, one removed.
fn change(e: &Engine, seed: u64) {
    let id = snap(e, "src").id;
    let m = e.mount(id).unwrap();
    let root = proc_path(m.root());
    std::fs::write(root.join(format!("new-{seed}.bin")), pattern(1 << 20, seed)).unwrap();
    std::fs::write(root.join("dir/a.bin"), pattern(2 << 20, seed)).unwrap();
    let _ = std::fs::remove_file(root.join(format!("new-{}.bin", seed - 1)));
    std::fs::create_dir_all(root.join(format!("d{seed}/e"))).unwrap();
    thinfs::sys::fsio::syncfs(m.root()).unwrap();
}

#[test]
#[ignore = "needs device-mapper: scripts/dm-test runs it in a QEMU guest"]
fn dm_backup_from_reflink_restores_into_dm() {
    let (sr, sd, sf) = (
        Scratch::new("bkrefl"),
        Scratch::new("bkdm"),
        Scratch::new("bkfile"),
    );
    let r = open_on(&sr, "reflink");
    let d = open_on(&sd, "dm");
    assert_eq!(r.backend().kind(), "reflink");
    assert_eq!(d.backend().kind(), "dm");
    let img = r.create_image(&n("src"), Some(Bytes(256 << 20))).unwrap();
    {
        let m = r.mount(img.id).unwrap();
        populate(&proc_path(m.root()));
        thinfs::sys::fsio::syncfs(m.root()).unwrap();
    }
    let snaps = ["v1", "v2", "v3"];
    for (i, s) in snaps.iter().enumerate() {
        if i > 0 {
            change(&r, i as u64 + 1);
        }
        r.snapshot(img.id, &n(s)).unwrap();
    }
    // The head differs from the newest snapshot.
    change(&r, 9);

    let file = sf.path().join("src.thinfs-backup");
    let (rs, ds) = (Service::new(r.clone(), None), Service::new(d.clone(), None));
    let out = std::fs::File::create(&file).unwrap();
    let req = BackupRequest {
        name: "src".into(),
        snapshots: true,
    };
    let idx = rs.backup(&root(), &req, out, &Job::new()).unwrap();
    assert_eq!(idx.backend, "reflink");
    assert_eq!(idx.sections.len(), snaps.len() + 1, "{idx:?}");
    let t = std::time::Instant::now();
    let input = std::fs::File::open(&file).unwrap();
    let req = RestoreRequest {
        name: Some("copy".into()),
    };
    ds.restore(&root(), &req, input, &Job::new()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    for s in snaps {
        assert_same_tree(&r, &format!("src@{s}"), &d, &format!("copy@{s}"));
    }
    assert_same_tree(&r, "src", &d, "copy");
    let names: Vec<String> = d
        .records()
        .unwrap()
        .iter()
        .map(|x| x.name.to_string())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("restore") || n.contains("backup")),
        "nothing temporary is left: {names:?}"
    );
    for t in ["copy@v1", "copy@v3", "copy"] {
        let (code, out) = d.fsck(&Target::parse(t).unwrap()).unwrap();
        assert_eq!(code, 0, "fsck {t}: {out}");
    }
    eprintln!(
        "dm-backup: {} byte backup of 3 snapshots and the head, made on reflink, restored on dm in {secs:.2}s",
        std::fs::metadata(&file).unwrap().len()
    );
}
