//! Root tests of what arrives from outside in a stream, a backup or an
//! import (issue 22, items 2 and 8): an ext4 made by someone else is
//! mounted with thinfs's own `errors=` and checked before it is
//! published; names follow the new-name rules; sizes the pool could never
//! hold are refused; a receive into a full pool stops with ENOSPC. Every
//! refusal leaves nothing: no record, no device, no pool space.
//!
//! The ext4 filesystems are made here with mkfs.ext4 on plain files and
//! sent as streams written with the stream encoder, as a hostile sender
//! would. None of them is ever made to hit an error on this host.

mod common;

use common::stream::*;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use thinfs::engine::{Engine, Target};
use thinfs::error::Error;
use thinfs::meta::Identity;
use thinfs::stream::{Encoder, StreamHeader};
use thinfs::types::{Bytes, Name};

const BLOCK: usize = 4096;
const FS_SIZE: u64 = 64 << 20;

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A 64M ext4 on a plain file, holding `hello` and a directory `d` of 50
/// files; with `panic`, its superblock says `errors=panic`.
fn ext4_file(dir: &Path, name: &str, panic: bool) -> PathBuf {
    let src = dir.join(format!("{name}.src"));
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("hello"), b"hello from outside").unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("d/f{i}")), format!("{i}")).unwrap();
    }
    let img = dir.join(format!("{name}.img"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(FS_SIZE)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-O", "metadata_csum_seed"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1", "-d"])
        .arg(&src)
        .arg(&img));
    if panic {
        run(Command::new("tune2fs").args(["-e", "panic"]).arg(&img));
        let h = run(Command::new("dumpe2fs").arg("-h").arg(&img));
        assert!(
            h.lines()
                .any(|l| l.starts_with("Errors behavior:") && l.ends_with("Panic")),
            "the test's filesystem must say errors=panic: {h}"
        );
    }
    img
}

/// The first block of directory `path` in the ext4 on `img`.
fn dir_block(img: &Path, path: &str) -> u64 {
    let out = run(Command::new("debugfs")
        .args(["-R", &format!("blocks {path}")])
        .arg(img));
    out.split_whitespace().next().unwrap().parse().unwrap()
}

/// `img` with block `block` overwritten by a pattern: e2fsck -fn finds
/// the directory damaged ("directory corrupted").
fn plant_damage(img: &Path, block: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&pattern(BLOCK, 77), block * BLOCK as u64)
        .unwrap();
}

fn header(name: &str, base: Option<Identity>, size: u64) -> StreamHeader {
    StreamHeader {
        flags: 0,
        snap_name: name.to_string(),
        snap_id: Identity::random().unwrap(),
        base_id: base,
        size,
        block_size: BLOCK as u32,
        resume: None,
    }
}

/// A stream of the blocks `blocks` (all non-zero ones if None) of the
/// device image `img`, as snapshot `name` (incremental from `base`).
fn stream_of(img: &Path, name: &str, base: Option<Identity>, blocks: Option<&[u64]>) -> Vec<u8> {
    let size = std::fs::metadata(img).unwrap().len();
    stream_with(img, header(name, base, size), blocks)
}

/// The same with header `h`.
fn stream_with(img: &Path, h: StreamHeader, blocks: Option<&[u64]>) -> Vec<u8> {
    let data = std::fs::read(img).unwrap();
    let mut e = Encoder::new(Vec::new(), h).unwrap();
    for (i, b) in data.chunks(BLOCK).enumerate() {
        let keep = match blocks {
            Some(list) => list.contains(&(i as u64)),
            None => b.iter().any(|&x| x != 0),
        };
        if keep {
            e.data((i * BLOCK) as u64, b).unwrap();
        }
    }
    e.finish().unwrap().0
}

/// The ext4 options of the mounted filesystem on block device `dev`.
fn ext4_options(dev: &Path) -> String {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/proc/fs/ext4/{name}/options")).unwrap()
}

fn errors_option(opts: &str) -> Option<&str> {
    opts.lines().find(|l| l.starts_with("errors="))
}

/// `refuse` checks a refusal: the pool exactly as before, its space back.
fn refused(e: &Engine, before: &(Vec<String>, Vec<u32>), used_before: u64, what: &str) {
    assert_eq!(&pool_state(e), before, "{what}: a refusal leaves nothing");
    // XFS frees the blocks of a deleted file in the background.
    wait_event(
        || {
            format!(
                "{what}: a refusal frees its space: {used_before} -> {}",
                used(e)
            )
        },
        || used(e) <= used_before + (1 << 20),
    );
}

#[test]
fn root_received_panic_ext4_is_mounted_errors_remount_ro() {
    let s = Scratch::new("recv-panic");
    let e = open(s.path());
    let img = ext4_file(s.path(), "panicky", true);
    let r = receive(&e, "panicky", false, &stream_of(&img, "s1", None, None)).unwrap();
    // The image (read-write) and its snapshot (read-only): the daemon's
    // option, never the superblock's.
    for id in [r.image.id, r.snapshot.id] {
        let m = e.mount(id).unwrap();
        assert_eq!(read_file(m.root(), "hello").unwrap(), b"hello from outside");
        let opts = ext4_options(m.device().path());
        assert_eq!(
            errors_option(&opts),
            Some("errors=remount-ro"),
            "{}: {opts}",
            r.image.name
        );
        drop(m);
        e.unmount(id);
    }
    // An image thinfs made itself: the same option.
    let own = e.create_image(&n("own"), Some(Bytes(64 << 20))).unwrap();
    let m = e.mount(own.id).unwrap();
    let opts = ext4_options(m.device().path());
    assert_eq!(errors_option(&opts), Some("errors=remount-ro"), "{opts}");
}

#[test]
fn root_received_damaged_ext4_is_refused_and_leaves_nothing() {
    let s = Scratch::new("recv-damaged");
    let e = open(s.path());
    let good = ext4_file(s.path(), "good", false);
    let block = dir_block(&good, "/d");
    let bad = s.path().join("bad.img");
    std::fs::copy(&good, &bad).unwrap();
    plant_damage(&bad, block);
    let check = |err: Error, what: &str| {
        let m = err.to_string();
        assert_eq!(err.errno(), libc::EBADMSG, "{what}: {m}");
        assert!(
            m.contains("the received filesystem is damaged, e2fsck -fn found:")
                && m.contains("Directory inode")
                && m.contains("nothing was received"),
            "{what}: the message says what e2fsck found: {m}"
        );
    };

    // A full stream.
    let (before, used0) = (pool_state(&e), used(&e));
    let err = receive(&e, "bad", false, &stream_of(&bad, "s1", None, None)).unwrap_err();
    check(err, "full");
    refused(&e, &before, used0, "full");

    // The same with -s (a partial receive): nothing kept to resume.
    let stream = stream_of(&bad, "s1", None, None);
    let mut input: &[u8] = &stream;
    let err = e
        .receive_stream_with(&n("bad"), false, true, &mut input, &Quiet)
        .unwrap_err();
    check(err, "full, -s");
    assert!(e.partial_receives().unwrap().is_empty());
    refused(&e, &before, used0, "full, -s");

    // A resumed receive (`receive -s`, cut, then `send -t`): refused
    // when complete, and its partial receive goes too.
    let h = header("s1", None, FS_SIZE);
    let stream = stream_with(&bad, h.clone(), None);
    let mut cut: &[u8] = &stream[..stream.len() / 2];
    e.receive_stream_with(&n("bad"), false, true, &mut cut, &Quiet)
        .unwrap_err();
    let p = e.partial_receives().unwrap();
    assert_eq!(p.len(), 1, "the cut -s receive keeps its partial state");
    let resumed = StreamHeader {
        flags: thinfs::stream::FLAG_RESUME,
        resume: Some(thinfs::stream::Resume {
            offset: p[0].received,
            token: p[0].receive_resume_token.clone(),
        }),
        ..h
    };
    let blocks: Vec<u64> = {
        let data = std::fs::read(&bad).unwrap();
        data.chunks(BLOCK)
            .enumerate()
            .filter(|(i, b)| (*i * BLOCK) as u64 >= p[0].received && b.iter().any(|&x| x != 0))
            .map(|(i, _)| i as u64)
            .collect()
    };
    let rest = stream_with(&bad, resumed, Some(&blocks));
    let mut input: &[u8] = &rest;
    let err = e
        .receive_stream(&n("bad"), false, &mut input, &Quiet)
        .unwrap_err();
    check(err, "resumed");
    assert!(e.partial_receives().unwrap().is_empty());
    refused(&e, &before, used0, "resumed");

    // An incremental stream onto a good image: only the damaged block.
    let r = receive(&e, "img", false, &stream_of(&good, "s1", None, None)).unwrap();
    let (before, used0) = (pool_state(&e), used(&e));
    let inc = stream_of(&bad, "s2", r.snapshot.identity, Some(&[block][..]));
    let err = receive(&e, "img", false, &inc).unwrap_err();
    check(err, "incremental");
    refused(&e, &before, used0, "incremental");
    // The image is as it was, and takes a good incremental.
    let inc_ok = stream_of(&good, "s2", r.snapshot.identity, Some(&[block][..]));
    receive(&e, "img", false, &inc_ok).unwrap();
}

#[test]
fn root_received_names_follow_the_new_name_rules() {
    let s = Scratch::new("recv-names");
    let e = open(s.path());
    let good = ext4_file(s.path(), "good", false);
    let (before, used0) = (pool_state(&e), used(&e));
    for bad in [
        "-thinfs-backup-head-1",
        "-x",
        "red\x1b[31m",
        "two\nlines",
        "c1\u{9b}",
    ] {
        let err = receive(&e, "img", false, &stream_of(&good, bad, None, None)).unwrap_err();
        let m = err.to_string();
        assert_eq!(err.errno(), libc::EBADMSG, "{bad:?}: {m}");
        assert!(m.contains("snapshot name in the header"), "{bad:?}: {m}");
        assert!(
            !m.chars().any(|c| c.is_control()),
            "the message shows no raw control character: {m:?}"
        );
        refused(&e, &before, used0, bad);
    }
    // Incremental too.
    let r = receive(&e, "img", false, &stream_of(&good, "s1", None, None)).unwrap();
    let (before, used0) = (pool_state(&e), used(&e));
    let err = receive(
        &e,
        "img",
        false,
        &stream_of(
            &good,
            "-thinfs-backup-head-2",
            r.snapshot.identity,
            Some(&[][..]),
        ),
    )
    .unwrap_err();
    assert_eq!(err.errno(), libc::EBADMSG, "{err}");
    refused(&e, &before, used0, "incremental");
}

fn caller() -> thinfs::service::Caller {
    thinfs::service::Caller {
        uid: 0,
        gid: 0,
        pid: std::process::id(),
        groups: Some(std::sync::Arc::from(Vec::new())),
    }
}

/// Copy backup file `from` to `to` with its index changed by `edit` (and
/// the trailer's length and hash made to match), as a forger would.
fn rewrite_index(from: &Path, to: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let data = std::fs::read(from).unwrap();
    let end = b"THINFS-BACKUP-END\n".len();
    let tail = 8 + 32 + end;
    let ilen = u64::from_le_bytes(data[data.len() - tail..][..8].try_into().unwrap()) as usize;
    let at = data.len() - tail - ilen;
    let mut idx: serde_json::Value = serde_json::from_slice(&data[at..at + ilen]).unwrap();
    edit(&mut idx);
    let json = serde_json::to_vec(&idx).unwrap();
    let mut out = data[..at].to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&json).as_bytes());
    out.extend_from_slice(&data[data.len() - end..]);
    std::fs::write(to, out).unwrap();
}

#[test]
fn root_received_backup_names_follow_the_new_name_rules() {
    use thinfs::service::{BackupRequest, Job, RestoreRequest, Service};
    let (sa, sb) = (Scratch::new("bk-names-a"), Scratch::new("bk-names-b"));
    let a = Service::new(std::sync::Arc::new(open(sa.path())), None);
    let b = Service::new(std::sync::Arc::new(open(sb.path())), None);
    let img = a
        .engine()
        .create_image(&n("src"), Some(Bytes(64 << 20)))
        .unwrap();
    // Names an older version (or a hand-made backup) may carry: the
    // engine takes them from its caller; a request could not make them.
    for (i, bad) in ["-thinfs-backup-head-7", "esc\x1b]0;x\x07"]
        .iter()
        .enumerate()
    {
        let snap = a
            .engine()
            .snapshot(img.id, &Name::new(bad).unwrap())
            .unwrap();
        let path = sa.path().join(format!("b{i}.backup"));
        let req = BackupRequest {
            name: "src".into(),
            snapshots: true,
        };
        a.backup(
            &caller(),
            &req,
            std::fs::File::create(&path).unwrap(),
            &Job::new(),
        )
        .unwrap();
        let (before, used0) = (pool_state(b.engine()), used(b.engine()));
        let req = RestoreRequest {
            name: Some(format!("copy{i}")),
        };
        let err = b
            .restore(
                &caller(),
                &req,
                std::fs::File::open(&path).unwrap(),
                &Job::new(),
            )
            .unwrap_err();
        let m = err.to_string();
        assert_eq!(err.errno(), libc::EBADMSG, "{bad:?}: {m}");
        assert!(m.contains("invalid name"), "{bad:?}: {m}");
        assert!(!m.chars().any(|c| c.is_control()), "{m:?}");
        refused(b.engine(), &before, used0, bad);
        a.engine().destroy_id(snap.id).unwrap();
    }
    // A backup with good names restores (its head carrier included).
    a.engine().snapshot(img.id, &n("good")).unwrap();
    let path = sa.path().join("ok.backup");
    let req = BackupRequest {
        name: "src".into(),
        snapshots: true,
    };
    a.backup(
        &caller(),
        &req,
        std::fs::File::create(&path).unwrap(),
        &Job::new(),
    )
    .unwrap();
    // Labels of the index pass the rules of a label request: a backup
    // file whose index was rewritten (its trailer hash too) with a label
    // key holding '=' is refused, and leaves nothing.
    let bad_path = sa.path().join("bad-label.backup");
    rewrite_index(&path, &bad_path, |idx| {
        idx["labels"]["k=v"] = serde_json::json!("x");
    });
    let (before, used0) = (pool_state(b.engine()), used(b.engine()));
    let req = RestoreRequest {
        name: Some("labelled".into()),
    };
    let err = b
        .restore(
            &caller(),
            &req,
            std::fs::File::open(&bad_path).unwrap(),
            &Job::new(),
        )
        .unwrap_err();
    // The backup reader refuses it (a label of the index is checked as it
    // is parsed), before the restore's own check of labels would.
    assert_eq!(err.errno(), libc::EBADMSG, "{err}");
    assert!(err.to_string().contains("bad label key"), "{err}");
    refused(b.engine(), &before, used0, "label key");
    let req = RestoreRequest {
        name: Some("copy".into()),
    };
    b.restore(
        &caller(),
        &req,
        std::fs::File::open(&path).unwrap(),
        &Job::new(),
    )
    .unwrap();
    let copy = b.engine().resolve(&Target::parse("copy").unwrap()).unwrap();
    let names: Vec<String> = b
        .engine()
        .snapshots_of(copy.id)
        .unwrap()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["good"]);
}

#[test]
fn root_received_sizes_beyond_the_pool_are_refused() {
    let s = Scratch::new("recv-size");
    let e = open(s.path());
    let (before, used0) = (pool_state(&e), used(&e));
    // 8 EiB, 1 EiB + 4 KiB (beyond the largest ext4), and 1 PiB (its
    // ext4 metadata alone, 16 GiB, is more than the 8G pool).
    for size in [8u64 << 60, (1 << 60) + 4096, 1 << 50] {
        let stream = Encoder::new(Vec::new(), header("s1", None, size))
            .unwrap()
            .finish()
            .unwrap()
            .0;
        let err = receive(&e, "huge", false, &stream).unwrap_err();
        let m = err.to_string();
        assert_eq!(err.errno(), libc::ENOSPC, "{size}: {m}");
        assert!(m.contains("cannot receive huge@s1"), "{m}");
        assert!(
            m.contains("larger than the largest ext4") || m.contains("the pool has"),
            "the message gives the numbers: {m}"
        );
        refused(&e, &before, used0, &format!("size {size}"));
    }
    // An import of such a size is refused the same way.
    let err = e
        .import_image(&n("huge"), &n("import"), Bytes(1 << 50), &mut |_| Ok(()))
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    refused(&e, &before, used0, "import");
}

#[test]
fn root_received_into_a_full_pool_stops_with_enospc() {
    let s = Scratch::new("recv-full");
    let mut o = opts(s.path());
    o.pool_size = Bytes(512 << 20);
    o.reserve = Some(Bytes(16 << 20));
    let e = Engine::open_pool(&o).expect("open a 512M pool");
    let (before, used0) = (pool_state(&e), used(&e));
    let free = e.backend().status().unwrap().available;
    // A stream of more data than the pool has free, written as it is
    // received (through a pipe): 1 MiB blocks of non-zero bytes.
    let want = free + (64 << 20);
    let (mut rx, tx) = std::io::pipe().unwrap();
    let writer = std::thread::spawn(move || {
        let mut enc = Encoder::new(tx, header("s1", None, 2 << 30)).unwrap();
        let chunk = pattern(1 << 20, 3);
        let mut off = 0;
        while off < want {
            if enc.data(off, &chunk).is_err() {
                return; // the receiver stopped reading
            }
            off += chunk.len() as u64;
        }
        let _ = enc.finish();
    });
    let err = e
        .receive_stream(&n("big"), false, &mut rx, &Quiet)
        .unwrap_err();
    drop(rx);
    writer.join().unwrap();
    let m = err.to_string();
    assert_eq!(err.errno(), libc::ENOSPC, "{m}");
    assert!(
        m.contains("receive big@s1: the pool is full (") && m.contains(" free"),
        "the message names the pool and what is free: {m}"
    );
    assert!(m.contains("nothing was received"), "{m}");
    refused(&e, &before, used0, "full pool");
}

#[test]
fn root_received_containerd_mounts_carry_the_errors_option() {
    use std::collections::BTreeMap;
    use thinfs::engine::containerd::Layers;
    let s = Scratch::new("ctd-errors");
    let layers = Layers::new(std::sync::Arc::new(open(s.path())));
    let active = layers
        .prepare("ns/1/active", "", BTreeMap::new(), false)
        .unwrap();
    assert_eq!(active.options, ["errors=remount-ro"]);
    assert_eq!(layers.mounts("ns/1/active").unwrap(), active);
    layers
        .commit("ns/1/layer", "ns/1/active", BTreeMap::new())
        .unwrap();
    let view = layers
        .prepare("ns/1/view", "ns/1/layer", BTreeMap::new(), true)
        .unwrap();
    assert_eq!(view.options, ["ro", "errors=remount-ro"]);
    // The kernel takes them as containerd passes them (mount(2) data).
    let dir = s.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    run(Command::new("mount")
        .args(["-t", &view.fs, "-o", &view.options.join(",")])
        .arg(&view.source)
        .arg(&dir));
    let opts = ext4_options(&view.source);
    run(Command::new("umount").arg(&dir));
    assert_eq!(errors_option(&opts), Some("errors=remount-ro"), "{opts}");
    layers.remove("ns/1/view").unwrap();
    layers.remove("ns/1/layer").unwrap();
}

#[test]
fn root_received_temporaries_carry_a_mark_no_one_else_can_set() {
    use thinfs::engine::{TEMPORARY_LABEL, is_temporary};
    use thinfs::service::{BackupRequest, Job, RestoreRequest, Service};
    let (sa, sb) = (Scratch::new("tmp-mark-a"), Scratch::new("tmp-mark-b"));
    let a = Service::new(std::sync::Arc::new(open(sa.path())), None);
    let b = Service::new(std::sync::Arc::new(open(sb.path())), None);
    let e = a.engine();
    let img = e.create_image(&n("src"), Some(Bytes(64 << 20))).unwrap();
    // The daemon's own temporary snapshot: marked when it is made.
    let t = e
        .snapshot_temporary(img.id, &n("carrier"), "backup-head")
        .unwrap();
    assert!(is_temporary(&t, "backup-head"));
    assert!(is_temporary(&snap(e, "src@carrier"), "backup-head"));
    assert!(!is_temporary(&snap(e, "src@carrier"), "restore"));
    e.destroy_id(t.id).unwrap();
    // A user's snapshot cannot be given the mark.
    e.snapshot(img.id, &n("mine")).unwrap();
    let err = e
        .set_label(
            &Target::parse("src@mine").unwrap(),
            TEMPORARY_LABEL,
            Some("backup-head"),
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
    assert!(!is_temporary(&snap(e, "src@mine"), "backup-head"));
    // An image received under a daemon's name (a restore) is marked until
    // the rename that publishes it.
    let good = ext4_file(sa.path(), "good", false);
    let stream = stream_of(&good, "s1", None, None);
    receive(b.engine(), "-thinfs-restore-1-0", false, &stream).unwrap();
    assert!(is_temporary(
        &snap(b.engine(), "-thinfs-restore-1-0"),
        "restore"
    ));
    b.engine()
        .rename(&Target::parse("-thinfs-restore-1-0").unwrap(), &n("done"))
        .unwrap();
    assert!(!is_temporary(&snap(b.engine(), "done"), "restore"));
    // A backup whose index carries the mark is refused, and leaves nothing.
    let path = sa.path().join("b.backup");
    let req = BackupRequest {
        name: "src".into(),
        snapshots: true,
    };
    a.backup(
        &caller(),
        &req,
        std::fs::File::create(&path).unwrap(),
        &Job::new(),
    )
    .unwrap();
    let forged = sa.path().join("forged.backup");
    rewrite_index(&path, &forged, |idx| {
        idx["labels"][TEMPORARY_LABEL] = serde_json::json!("restore");
    });
    let (before, used0) = (pool_state(b.engine()), used(b.engine()));
    let req = RestoreRequest {
        name: Some("copy".into()),
    };
    let err = b
        .restore(
            &caller(),
            &req,
            std::fs::File::open(&forged).unwrap(),
            &Job::new(),
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
    refused(b.engine(), &before, used0, "forged mark");
}

#[test]
fn root_received_snapshot_with_open_deleted_files_passes_the_check() {
    // A snapshot taken while files were open but deleted carries them on
    // ext4's orphan list: e2fsck -fn must not take that for damage.
    let (sa, sb) = (Scratch::new("orphan-a"), Scratch::new("orphan-b"));
    let (a, b) = (open(sa.path()), open(sb.path()));
    let img = a.create_image(&n("src"), Some(Bytes(64 << 20))).unwrap();
    let m = a.mount(img.id).unwrap();
    let mut held = Vec::new();
    for i in 0..3 {
        let name = format!("gone{i}");
        write_file(m.root(), &name, &pattern(1 << 20, i));
        let p = proc_path(m.root()).join(&name);
        held.push(std::fs::File::open(&p).unwrap());
        std::fs::remove_file(&p).unwrap();
    }
    write_file(m.root(), "kept", b"kept");
    a.snapshot(img.id, &n("s1")).unwrap();
    let full = send(&a, "src@s1", None);
    receive(&b, "copy", false, &full).unwrap();
    // And an incremental with more of them.
    write_file(m.root(), "gone9", &pattern(1 << 20, 9));
    let p = proc_path(m.root()).join("gone9");
    held.push(std::fs::File::open(&p).unwrap());
    std::fs::remove_file(&p).unwrap();
    a.snapshot(img.id, &n("s2")).unwrap();
    let inc = send(&a, "src@s2", Some("src@s1"));
    receive(&b, "copy", false, &inc).unwrap();
    drop(held);
    assert_same_tree(&a, "src@s2", &b, "copy@s2");
}

#[test]
fn root_received_restore_into_a_full_pool_stops_with_enospc() {
    use std::io::Write;
    use thinfs::service::{BackupRequest, Job, RestoreRequest, Service};
    let (sa, sb) = (
        Scratch::new("restore-full-a"),
        Scratch::new("restore-full-b"),
    );
    let a = Service::new(std::sync::Arc::new(open(sa.path())), None);
    let mut o = opts(sb.path());
    o.pool_size = Bytes(512 << 20);
    o.reserve = Some(Bytes(16 << 20));
    let b = Service::new(
        std::sync::Arc::new(Engine::open_pool(&o).expect("open a 512M pool")),
        None,
    );
    let free = b.engine().backend().status().unwrap().available;
    // An image holding more data than the small pool has free.
    let img = a
        .engine()
        .create_image(&n("src"), Some(Bytes(1 << 30)))
        .unwrap();
    {
        let m = a.engine().mount(img.id).unwrap();
        let mut f = std::fs::File::create(proc_path(m.root()).join("big")).unwrap();
        let chunk = pattern(1 << 20, 5);
        for _ in 0..(free >> 20) + 64 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let path = sa.path().join("big.backup");
    let req = BackupRequest {
        name: "src".into(),
        snapshots: false,
    };
    a.backup(
        &caller(),
        &req,
        std::fs::File::create(&path).unwrap(),
        &Job::new(),
    )
    .unwrap();
    let (before, used0) = (pool_state(b.engine()), used(b.engine()));
    let req = RestoreRequest {
        name: Some("copy".into()),
    };
    let err = b
        .restore(
            &caller(),
            &req,
            std::fs::File::open(&path).unwrap(),
            &Job::new(),
        )
        .unwrap_err();
    let m = err.to_string();
    assert_eq!(err.errno(), libc::ENOSPC, "{m}");
    assert!(
        m.contains("the pool is full (") && m.contains(" free"),
        "the message names the pool and what is free: {m}"
    );
    refused(b.engine(), &before, used0, "restore into a full pool");
}
