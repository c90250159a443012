//! Supplementary groups of users who are not root: read from `/proc` (about
//! 20 µs a request, as much as the rest of a CREATE) only where they can
//! change what ext4 decides, and still honoured there. Counted with the
//! daemon's `group_reads` counter in `.thinfs/pool.json`, not timed.
//!
//! Run as root: `cargo test --test root_groups -- --test-threads=1`.

mod common;

use common::{TestMount, as_user};
use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};

const USER: u32 = 4242;
const GROUP: u32 = 4300;
const N: u64 = 50;

fn group_reads(m: &TestMount) -> u64 {
    let raw = fs::read(m.path(".thinfs/pool.json")).expect("read pool.json");
    let v: serde_json::Value = serde_json::from_slice(&raw).expect("pool.json parses");
    v["fuse"]["group_reads"]
        .as_u64()
        .expect("pool.json: fuse.group_reads")
}

fn dir(m: &TestMount, rel: &str, mode: u32, gid: u32) {
    fs::create_dir(m.path(rel)).unwrap();
    chown(m.path(rel), Some(0), Some(gid)).unwrap();
    fs::set_permissions(m.path(rel), fs::Permissions::from_mode(mode)).unwrap();
}

/// Every operation that checks only the directory (create, mkdir,
/// symlink, mknod, unlink, rmdir) or an open file's own bits, by a user
/// in a shared 0777 or 1777 directory it does not own, or on a file whose
/// group and other bits agree: no group read. Before, every one of them
/// read `/proc` (twice for a create: the file, then its passthrough
/// registration).
#[test]
fn root_groups_not_read_where_they_cannot_matter() {
    let m = TestMount::start("groups-moot");
    fs::create_dir(m.path("img")).unwrap();
    dir(&m, "img/shared", 0o777, 0);
    dir(&m, "img/tmp", 0o1777, 0);
    fs::write(m.path("img/readme"), b"for all").unwrap();
    fs::set_permissions(m.path("img/readme"), fs::Permissions::from_mode(0o644)).unwrap();
    let before = group_reads(&m);
    let script = format!(
        "set -e; cd {img}
         for d in shared tmp; do
           for i in $(seq {N}); do echo x > $d/f$i; done
           for i in $(seq {N}); do cat $d/f$i > /dev/null; done
           mkdir $d/sub; ln -s f1 $d/link; mkfifo $d/fifo
           rm $d/link $d/fifo; rmdir $d/sub
           for i in $(seq {N}); do rm $d/f$i; done
         done
         cat readme > /dev/null
         ! echo y > readme",
        img = m.path("img").display()
    );
    let (ok, out) = as_user(USER, USER, &[GROUP], &script);
    assert!(ok, "non-owner operations failed: {out}");
    assert!(fs::read_dir(m.path("img/shared")).unwrap().next().is_none());
    assert_eq!(fs::read(m.path("img/readme")).unwrap(), b"for all");
    let reads = group_reads(&m) - before;
    assert_eq!(
        reads,
        0,
        "{reads} group reads for {} operations whose outcome groups cannot change",
        6 * N
    );
}

/// Where membership does change the outcome, the groups are read and
/// honoured: a group directory (0770), a directory whose ACL names the
/// group, a file writable by its group only, and a setgid bit to keep.
#[test]
fn root_groups_read_and_honoured_where_they_matter() {
    let m = TestMount::start("groups-matter");
    fs::create_dir(m.path("img")).unwrap();
    dir(&m, "img/team", 0o770, GROUP);
    dir(&m, "img/acl", 0o700, 0);
    let st = std::process::Command::new("setfacl")
        .args(["-m", &format!("g:{GROUP}:rwx")])
        .arg(m.path("img/acl"))
        .status()
        .expect("run setfacl");
    assert!(st.success(), "setfacl");
    fs::write(m.path("img/team-file"), b"old").unwrap();
    chown(m.path("img/team-file"), Some(0), Some(GROUP)).unwrap();
    fs::set_permissions(m.path("img/team-file"), fs::Permissions::from_mode(0o664)).unwrap();

    let before = group_reads(&m);
    let script = format!(
        "set -e; cd {img}
         for d in team acl; do
           echo x > $d/f; mkdir $d/sub; rmdir $d/sub; rm $d/f
         done
         echo new > team-file
         echo s > team/s; chgrp {GROUP} team/s; chmod 2755 team/s",
        img = m.path("img").display()
    );
    let (ok, out) = as_user(USER, USER, &[GROUP], &script);
    assert!(ok, "a member of the group was refused: {out}");
    assert_eq!(fs::read(m.path("img/team-file")).unwrap(), b"new\n");
    let reads = group_reads(&m) - before;
    assert!(
        reads >= 9,
        "only {reads} group reads where membership decides"
    );
    let mode = fs::metadata(m.path("img/team/s"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o7777,
        0o2755,
        "setgid kept for a member of the group"
    );

    // Without the group, the same operations are refused.
    let (ok, out) = as_user(
        USER,
        USER,
        &[],
        &format!("echo x > {}/team/g", m.path("img").display()),
    );
    assert!(
        !ok,
        "a non-member created a file in a 0770 group directory: {out}"
    );
    let (ok, out) = as_user(
        USER,
        USER,
        &[],
        &format!("echo x > {}/acl/g", m.path("img").display()),
    );
    assert!(
        !ok,
        "a non-member created a file where only an ACL's group may: {out}"
    );
    let (ok, out) = as_user(
        USER,
        USER,
        &[],
        &format!("echo y > {}/team-file", m.path("img").display()),
    );
    assert!(
        !ok,
        "a non-member wrote a file writable by its group only: {out}"
    );
}
