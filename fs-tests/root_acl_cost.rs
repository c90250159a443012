//! What the kernel's ACL checks cost users who are not root, counted in
//! FUSE requests (kernel tracepoint `fuse:fuse_request_send`, filtered on
//! this mount's connection), not in time; and that ACLs keep denying and
//! granting on the virtual path to an image and inside it, also once the
//! kernel has cached them.
//!
//! The counts pin what kernel 6.18 makes us pay (see ARCHITECTURE.md, "What
//! the ACL checks cost"): a change that adds a round trip per file fails
//! here, and so does one that removes one without updating the figures.
//!
//! Run as root: `cargo test --test root_acl_cost -- --test-threads=1`.

mod common;

use common::{TestMount, as_user};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};

const OWNER: u32 = 4242;
const OTHER: u32 = 4243;
const SHARED: u32 = 4300;
const N: u64 = 200;

/// A tracefs instance of our own that counts FUSE requests per opcode for
/// one connection; removed on drop (even when the test panics).
struct Requests {
    dir: PathBuf,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl Requests {
    fn on(mnt: &Path) -> Requests {
        if !Path::new(TRACEFS).join("events").exists() {
            let st = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev", TRACEFS])
                .status()
                .expect("run mount");
            assert!(st.success(), "cannot mount tracefs at {TRACEFS}");
        }
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = Path::new(TRACEFS).join("instances").join(format!(
            "{}-{}-{n}",
            common::MARKER,
            std::process::id()
        ));
        fs::create_dir(&dir).expect("create a tracefs instance");
        let r = Requests { dir };
        // The kernel's dev_t: major << 20 | minor.
        let dev = fs::metadata(mnt).expect("stat mount").dev();
        let conn = (libc::major(dev) << 20) | libc::minor(dev);
        r.write(
            "events/fuse/fuse_request_send/filter",
            &format!("connection == {conn}"),
        );
        r.write("buffer_size_kb", "8192");
        r
    }

    fn write(&self, rel: &str, v: &str) {
        fs::write(self.dir.join(rel), v).unwrap_or_else(|e| panic!("write {rel}: {e}"));
    }

    /// Requests per opcode (`LOOKUP`, `GETXATTR`...) sent while `f` runs.
    fn during(&self, f: impl FnOnce()) -> BTreeMap<String, u64> {
        self.write("trace", "");
        self.write("events/fuse/fuse_request_send/enable", "1");
        f();
        self.write("events/fuse/fuse_request_send/enable", "0");
        let text = fs::read_to_string(self.dir.join("trace")).expect("read trace");
        assert!(
            !text.contains("LOST"),
            "trace buffer overflowed: counts would be wrong"
        );
        let mut c = BTreeMap::new();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some(op) = l.split("(FUSE_").nth(1).and_then(|r| r.split(')').next()) {
                *c.entry(op.to_string()).or_insert(0) += 1;
            }
        }
        c
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("events/fuse/fuse_request_send/enable"), "0");
        let _ = fs::remove_dir(&self.dir);
    }
}

fn dir(p: &Path, uid: u32, gid: u32, mode: u32) -> PathBuf {
    fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    chown(p, Some(uid), Some(gid)).expect("chown");
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    p.to_path_buf()
}

/// Create, stat and unlink N files named by `prefix` (an absolute path
/// walks through the mount root, a relative one starts at `cwd`), as
/// uid/gid with `groups`; requests per opcode for the N files.
fn workload(
    r: &Requests,
    who: (u32, u32, &[u32]),
    cwd: &Path,
    prefix: &str,
) -> BTreeMap<String, u64> {
    let cmd = format!(
        "cd {} && i=0; while [ $i -lt {N} ]; do : > {prefix}/f$i && stat {prefix}/f$i >/dev/null && rm {prefix}/f$i || exit 1; i=$((i+1)); done",
        cwd.display()
    );
    let mut out = (false, String::new());
    let c = r.during(|| out = as_user(who.0, who.1, who.2, &cmd));
    assert!(out.0, "workload as uid {} failed: {}", who.0, out.1);
    c
}

fn per_file(c: &BTreeMap<String, u64>, op: &str) -> f64 {
    *c.get(op).unwrap_or(&0) as f64 / N as f64
}

/// Round trips per file (create + stat + unlink) on kernel 6.18, for
/// root, a caller who owns the directory and one who is only in its group,
/// through relative and absolute paths. A path walk through the mount root
/// costs nothing (before: one GETXATTR per walk for everyone but root, as
/// the kernel never caches the root's ACLs; the root now has no group
/// bits, so the kernel does not ask). The directory still costs one
/// GETXATTR per create and per unlink for callers who are not its owner:
/// the kernel drops its cached ACL with its attributes after every change
/// (`fuse_dir_changed()`, then `fuse_perm_getattr()`).
#[test]
fn acl_round_trips_per_file_are_pinned() {
    let m = TestMount::start("aclcost");
    let img = m.path("img");
    fs::create_dir(&img).expect("create image");
    let own = dir(&img.join("own"), OWNER, OWNER, 0o755);
    let shared = dir(&img.join("shared"), OWNER, SHARED, 0o775);
    let r = Requests::on(&m.mnt);
    let mut report = String::new();
    let mut check = |name: &str, c: &BTreeMap<String, u64>, getxattr: f64| {
        report.push_str(&format!("{name}: {c:?}\n"));
        // The requests every caller pays: LOOKUP + CREATE + RELEASE,
        // GETATTR of the parent after the create and after the unlink
        // (default_permissions), UNLINK; stat is served from the cache.
        for (op, n) in [
            ("LOOKUP", 1.0),
            ("CREATE", 1.0),
            ("UNLINK", 1.0),
            ("GETATTR", 2.0),
        ] {
            let got = per_file(c, op);
            assert!(
                (got - n).abs() <= 0.05,
                "{name}: {got} {op} per file, expected {n}\n{report}"
            );
        }
        let got = per_file(c, "GETXATTR");
        assert!(
            (got - getxattr).abs() <= 0.05,
            "{name}: {got} GETXATTR per file, expected {getxattr}\n{report}"
        );
    };
    let root = workload(&r, (0, 0, &[]), &img, &img.display().to_string());
    check("root, absolute paths", &root, 0.0);
    let owner_rel = workload(&r, (OWNER, OWNER, &[]), &own, ".");
    check("owner, relative paths", &owner_rel, 0.0);
    let owner_abs = workload(&r, (OWNER, OWNER, &[]), &own, &own.display().to_string());
    check("owner, absolute paths", &owner_abs, 0.0);
    let member_rel = workload(&r, (OTHER, OTHER, &[SHARED]), &shared, ".");
    check("group member, relative paths", &member_rel, 2.0);
    let member_abs = workload(
        &r,
        (OTHER, OTHER, &[SHARED]),
        &shared,
        &shared.display().to_string(),
    );
    check("group member, absolute paths", &member_abs, 2.0);
    eprintln!("{report}");
}

fn setfacl(args: &[&str], p: &Path) {
    let o = std::process::Command::new("setfacl")
        .args(args)
        .arg(p)
        .output()
        .expect("run setfacl");
    assert!(
        o.status.success(),
        "setfacl {args:?} {}: {}",
        p.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `ls DIR` as uid/gid/groups, three times (the kernel has the ACL cached
/// after the first); all three must agree.
fn can_list(uid: u32, groups: &[u32], p: &Path) -> bool {
    let cmd = format!("ls {} >/dev/null", p.display());
    let first = as_user(uid, uid, groups, &cmd).0;
    for _ in 0..2 {
        assert_eq!(
            as_user(uid, uid, groups, &cmd).0,
            first,
            "uid {uid} on {}: answer changed once cached",
            p.display()
        );
    }
    first
}

/// An ACL on an image's root directory (reached through the virtual
/// root) and on a directory inside the image denies and grants exactly as
/// it says, also once cached, and a change made through the mount takes
/// effect at once.
#[test]
fn acls_deny_and_grant_on_the_path_to_an_image_and_inside() {
    let m = TestMount::start("aclcheck");
    let img = m.path("img");
    fs::create_dir(&img).expect("create image");
    fs::set_permissions(&img, fs::Permissions::from_mode(0o755)).expect("chmod");
    setfacl(&["-m", &format!("u:{OTHER}:---")], &img);
    assert!(
        !can_list(OTHER, &[], &img),
        "ACL on the image root must deny"
    );
    assert!(can_list(OWNER, &[], &img), "others keep the mode's rights");
    let inner = dir(&img.join("inner"), 0, SHARED, 0o770);
    setfacl(&["-m", "g:4301:r-x"], &inner);
    assert!(can_list(4244, &[SHARED], &inner), "owning group member");
    assert!(can_list(4245, &[4301], &inner), "ACL group member");
    assert!(!can_list(4246, &[4302], &inner), "neither");
    assert!(
        !can_list(OTHER, &[SHARED], &inner),
        "a path through a denying ACL stays closed to a member"
    );
    // Changes through the mount apply at once.
    setfacl(&["-x", &format!("u:{OTHER}")], &img);
    assert!(can_list(OTHER, &[SHARED], &inner), "ACL removed: member in");
    setfacl(&["-m", &format!("u:{OTHER}:---")], &img);
    assert!(
        !can_list(OTHER, &[SHARED], &inner),
        "ACL back: denied again"
    );
    setfacl(&["-m", "g:4301:---"], &inner);
    assert!(
        !can_list(4245, &[4301], &inner),
        "ACL group entry now denies"
    );
}
