//! Credentials and POSIX conformance through the FUSE mount (issue 10): each
//! test runs the same steps on a plain loop-mounted ext4 and inside a thinfs
//! image, as unprivileged users (a member of group 100 and nobody), and
//! expects the same results. The users are threads of this test process
//! with their own fsuid/fsgid/groups/umask, as in a multi-threaded program.
//! Run as root: `cargo test --test root_posix -- --test-threads=1`.

mod common;

use common::{Scratch, TestMount};
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, chown, symlink,
};
use std::path::{Path, PathBuf};
use thinfs::sys::creds::{Identity, become_user};

const USER: u32 = 4242;
const USERS: u32 = 100;
const NOBODY: u32 = 65534;

/// A plain ext4 on a loop device, unmounted on drop.
struct PlainExt4 {
    scratch: Scratch,
    dir: PathBuf,
}

impl PlainExt4 {
    fn new() -> PlainExt4 {
        let scratch = Scratch::new("ext4");
        let img = scratch.path().join("ext4.img");
        let dir = scratch.path().join("mnt");
        fs::create_dir_all(&dir).expect("mkdir");
        let f = fs::File::create(&img).expect("image");
        f.set_len(128 << 20).expect("size");
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status()
            .expect("mkfs")
            .success();
        assert!(ok, "mkfs.ext4");
        let ok = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount ext4");
        PlainExt4 { scratch, dir }
    }
}

impl Drop for PlainExt4 {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        common::wait_no_loops(self.scratch.path());
    }
}

/// A thinfs mount with one image, `base`.
fn thinfs(tag: &str) -> (TestMount, PathBuf) {
    let m = TestMount::start(tag);
    let base = m.path("base");
    fs::create_dir(&base).expect("create image");
    (m, base)
}

/// Run `f` in a new thread acting as uid/gid with `groups` and `umask`.
fn run_as<T: Send + 'static>(
    uid: u32,
    gid: u32,
    groups: &[u32],
    umask: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let groups = groups.to_vec();
    std::thread::spawn(move || {
        let _g = become_user(Identity {
            uid,
            gid,
            groups: Some(&groups),
            umask: Some(umask),
        })
        .expect("become user");
        f()
    })
    .join()
    .expect("user thread")
}

fn member<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    run_as(USER, USER, &[USERS], 0o002, f)
}

fn nobody<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    run_as(NOBODY, NOBODY, &[], 0o022, f)
}

/// "ok" or the errno of a result.
fn res<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// "uid gid mode" of a path (not following a final symlink).
fn owner(p: &Path) -> String {
    match fs::symlink_metadata(p) {
        Ok(m) => format!("{} {} {:o}", m.uid(), m.gid(), m.mode()),
        Err(e) => res::<()>(Err(e)),
    }
}

fn ctime(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).expect("stat");
    (m.ctime(), m.ctime_nsec())
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path")
}

fn errno_of(r: i32) -> String {
    if r == 0 {
        "ok".into()
    } else {
        res::<()>(Err(std::io::Error::last_os_error()))
    }
}

/// A directory made by root with owner and mode.
fn dir(p: &Path, uid: u32, gid: u32, mode: u32) -> PathBuf {
    fs::create_dir(p).expect("mkdir");
    chown(p, Some(uid), Some(gid)).expect("chown");
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    p.to_path_buf()
}

/// A file made by root with owner, mode and content.
fn file(p: &Path, uid: u32, gid: u32, mode: u32, data: &[u8]) -> PathBuf {
    fs::write(p, data).expect("write");
    chown(p, Some(uid), Some(gid)).expect("chown");
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    p.to_path_buf()
}

/// Run `steps` on a plain ext4 and in a thinfs image; both must give the
/// same (non-empty) record.
fn same_on_both(tag: &str, steps: fn(&Path) -> Vec<String>) {
    let ext4 = PlainExt4::new();
    let want = steps(&ext4.dir);
    drop(ext4);
    let (m, base) = thinfs(tag);
    let got = steps(&base);
    assert!(!want.is_empty(), "no steps recorded");
    let diff: Vec<String> = want
        .iter()
        .zip(got.iter())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  ext4:   {a}\n  thinfs: {b}"))
        .collect();
    assert!(
        diff.is_empty() && want.len() == got.len(),
        "thinfs differs from ext4:\n{}\n(ext4 {} steps, thinfs {})\nlog tail: {}",
        diff.join("\n"),
        want.len(),
        got.len(),
        m.log()
            .lines()
            .rfind(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
            .unwrap_or("")
    );
}

/// New nodes get uid = the caller, gid = the caller's or the setgid
/// directory's; the caller's umask applies; access may come via a group.
fn new_node_steps(base: &Path) -> Vec<String> {
    let sg = dir(&base.join("sg"), 0, USERS, 0o2770);
    let gw = dir(&base.join("gw"), 0, USERS, 0o770);
    let open = dir(&base.join("open"), 0, 0, 0o777);
    // The member's own setgid directory (the daemon's owner fast path).
    let own = dir(&base.join("own"), USER, USERS, 0o2775);
    // Owner bits decide for the owner, even when others may write.
    let shut = dir(&base.join("shut"), USER, USERS, 0o077);
    let mut out = Vec::new();
    for d in [&sg, &gw, &open, &own, &shut] {
        for (who, r) in [
            ("member", {
                let d = d.clone();
                member(move || make_all(&d, "m"))
            }),
            ("nobody", {
                let d = d.clone();
                nobody(move || make_all(&d, "n"))
            }),
        ] {
            out.push(format!(
                "{} {who}: {}",
                d.file_name().unwrap().to_string_lossy(),
                r
            ));
            for n in ["f", "d", "p", "s"] {
                let p = d.join(format!("{}{n}", &who[..1]));
                out.push(format!("  {n}: {}", owner(&p).replace(" 120777", " link")));
            }
        }
    }
    out
}

fn make_all(d: &Path, pfx: &str) -> String {
    let f = res(fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(d.join(format!("{pfx}f"))));
    let dd = res(fs::DirBuilder::new()
        .mode(0o777)
        .create(d.join(format!("{pfx}d"))));
    let c = cpath(&d.join(format!("{pfx}p")));
    // SAFETY: c is a valid C string.
    let p = errno_of(unsafe { libc::mknod(c.as_ptr(), libc::S_IFIFO | 0o666, 0) });
    let s = res(symlink("target", d.join(format!("{pfx}s"))));
    format!("create {f}, mkdir {dd}, mknod {p}, symlink {s}")
}

#[test]
fn new_nodes_owner_group_and_umask_as_on_ext4() {
    same_on_both("owners", new_node_steps);
}

/// A failed rename or unlink changes no ctime.
fn failed_change_steps(base: &Path) -> Vec<String> {
    let d = dir(&base.join("d"), 0, 0, 0o755);
    let f = file(&d.join("f"), 0, 0, 0o644, b"x");
    let t = dir(&base.join("t"), 0, 0, 0o1777);
    let tf = file(&t.join("f"), 0, 0, 0o666, b"x");
    let own = dir(&base.join("own"), USER, USER, 0o755);
    let a = dir(&own.join("a"), USER, USER, 0o755);
    let b = dir(&own.join("b"), USER, USER, 0o755);
    file(&b.join("inside"), USER, USER, 0o644, b"x");
    let all = [&d, &f, &t, &tf, &own, &a, &b];
    let before: Vec<_> = all.iter().map(|p| ctime(p)).collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut out = Vec::new();
    let (d2, t2, own2) = (d.clone(), t.clone(), own.clone());
    out.push(member(move || {
        format!(
            "rename {} unlink {} sticky-rename {} sticky-unlink {} notempty {}",
            res(fs::rename(d2.join("f"), d2.join("g"))),
            res(fs::remove_file(d2.join("f"))),
            res(fs::rename(t2.join("f"), t2.join("g"))),
            res(fs::remove_file(t2.join("f"))),
            res(fs::rename(own2.join("a"), own2.join("b"))),
        )
    }));
    for (p, c) in all.iter().zip(before) {
        out.push(format!(
            "{}: ctime {}",
            p.strip_prefix(base).unwrap().display(),
            if ctime(p) == c { "same" } else { "changed" }
        ));
    }
    out
}

#[test]
fn failed_rename_and_unlink_keep_ctime_as_on_ext4() {
    same_on_both("ctime", failed_change_steps);
}

/// chmod by an owner outside the file's group clears S_ISGID; a member
/// keeps it.
fn chmod_sgid_steps(base: &Path) -> Vec<String> {
    let d = dir(&base.join("d"), 0, 0, 0o777);
    let ing = file(&d.join("in-group"), USER, USERS, 0o755, b"x");
    let outg = file(&d.join("not-in-group"), USER, 0, 0o755, b"x");
    let (a, b) = (ing.clone(), outg.clone());
    let r = member(move || {
        format!(
            "{} {}",
            res(fs::set_permissions(&a, fs::Permissions::from_mode(0o2755))),
            res(fs::set_permissions(&b, fs::Permissions::from_mode(0o2755)))
        )
    });
    vec![r, owner(&ing), owner(&outg)]
}

#[test]
fn chmod_setgid_by_owner_needs_group_as_on_ext4() {
    same_on_both("chmod", chmod_sgid_steps);
}

/// The open that creates a file grants the access it asked for, whatever
/// the mode: ftruncate and posix_fallocate work on its descriptor.
fn creating_open_steps(base: &Path) -> Vec<String> {
    let d = dir(&base.join("d"), 0, USERS, 0o770);
    let p = d.join("ro");
    let mut out = vec![member(move || {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&p);
        let Ok(mut f) = f else {
            return format!("open {}", res(f));
        };
        let t = res(f.set_len(100));
        use std::os::fd::AsRawFd;
        // SAFETY: plain call on an open descriptor.
        let e = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 8192) };
        let w = res(f.write_all(b"data"));
        let m = f.metadata().map(|m| m.len()).unwrap_or(0);
        format!("ftruncate {t}, posix_fallocate {e}, write {w}, size {m}")
    })];
    out.push(owner(&d.join("ro")));
    out
}

#[test]
fn creating_open_grants_access_as_on_ext4() {
    same_on_both("creat0444", creating_open_steps);
}

/// Moving a directory to another parent needs write permission on it.
fn move_dir_steps(base: &Path) -> Vec<String> {
    let a = dir(&base.join("a"), 0, 0, 0o777);
    let b = dir(&base.join("b"), 0, 0, 0o777);
    dir(&a.join("roots"), 0, 0, 0o755);
    dir(&a.join("groups"), 0, USERS, 0o775);
    dir(&a.join("stay"), 0, 0, 0o755);
    let (a1, b1) = (a.clone(), b.clone());
    let r1 = member(move || {
        format!(
            "root's dir away {}, group-writable dir away {}, within parent {}",
            res(fs::rename(a1.join("roots"), b1.join("roots"))),
            res(fs::rename(a1.join("groups"), b1.join("groups"))),
            res(fs::rename(a1.join("stay"), a1.join("stayed"))),
        )
    });
    let (a2, b2) = (a.clone(), b.clone());
    let r2 = nobody(move || {
        format!(
            "nobody moves group dir back {}",
            res(fs::rename(b2.join("groups"), a2.join("groups"))),
        )
    });
    vec![r1, r2]
}

#[test]
fn moving_a_directory_needs_write_on_it_as_on_ext4() {
    same_on_both("movedir", move_dir_steps);
}

fn utimes(p: &Path, a: libc::timespec, m: libc::timespec) -> String {
    let c = cpath(p);
    let ts = [a, m];
    // SAFETY: c is a valid C string, ts two timespecs.
    errno_of(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) })
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// utimensat by a non-owner: explicit times need ownership (EPERM), "now"
/// needs write permission (EACCES).
fn utimes_steps(base: &Path) -> Vec<String> {
    let d = dir(&base.join("d"), 0, 0, 0o755);
    let w = file(&d.join("writable"), 0, 0, 0o666, b"x");
    let r = file(&d.join("readonly"), 0, 0, 0o644, b"x");
    let g = file(&d.join("groupw"), 0, USERS, 0o664, b"x");
    let mut out = Vec::new();
    for p in [w, r, g] {
        let p2 = p.clone();
        let f = move || {
            let omit = ts(0, libc::UTIME_OMIT);
            let now = ts(0, libc::UTIME_NOW);
            format!(
                "both {} atime-only {} mtime-only {} now {} now-omit {}",
                utimes(&p2, ts(1000, 0), ts(2000, 0)),
                utimes(&p2, ts(1000, 0), omit),
                utimes(&p2, omit, ts(2000, 0)),
                utimes(&p2, now, now),
                utimes(&p2, now, omit),
            )
        };
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let f2 = f.clone();
        out.push(format!("{name} member: {}", member(f)));
        out.push(format!("{name} nobody: {}", nobody(f2)));
    }
    out
}

#[test]
fn utimes_by_non_owner_as_on_ext4() {
    same_on_both("utimes", utimes_steps);
}

/// POSIX ACLs: a named-user entry denies, a named-group entry grants, a
/// default ACL overrides the umask.
fn acl_steps(base: &Path) -> Vec<String> {
    let d = dir(&base.join("d"), 0, 0, 0o755);
    file(&d.join("f"), 0, 0, 0o644, b"secret");
    let g = dir(&base.join("g"), 0, 0, 0o755);
    let dflt = dir(&base.join("dflt"), USER, USER, 0o755);
    let setfacl = |args: &[&str], p: &Path| {
        let o = std::process::Command::new("setfacl")
            .args(args)
            .arg(p)
            .output()
            .expect("setfacl");
        format!(
            "setfacl {}",
            if o.status.success() { "ok" } else { "failed" }
        )
    };
    let mut out = vec![
        setfacl(&["-m", "u:nobody:---"], &d),
        setfacl(&["-m", "g:100:rwx"], &g),
    ];
    let dd = dflt.clone();
    out.push(member(move || {
        let o = std::process::Command::new("setfacl")
            .args(["-d", "-m", "u::rwx,g::rwx,o::rwx"])
            .arg(&dd)
            .output();
        format!(
            "owner sets default acl: {}",
            res(o.map(|o| o.status.success()))
        )
    }));
    let (d2, g2, dd2) = (d.clone(), g.clone(), dflt.clone());
    out.push(nobody(move || {
        format!(
            "nobody: read {} list {} create-in-group-dir {}",
            res(fs::read(d2.join("f"))),
            res(fs::read_dir(&d2)),
            res(fs::File::create(g2.join("n"))),
        )
    }));
    out.push(member(move || {
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o777)
            .open(dd2.join("m"));
        format!(
            "member: create-in-group-dir {} create-under-default-acl {}",
            res(fs::File::create(g.join("m"))),
            res(f),
        )
    }));
    out.push(owner(&dflt.join("m")));
    out
}

#[test]
fn posix_acls_enforced_as_on_ext4() {
    same_on_both("acl", acl_steps);
}

fn copy_range(from: &Path, to: &fs::File) -> String {
    use std::os::fd::AsRawFd;
    let Ok(src) = fs::File::open(from) else {
        return "open source failed".into();
    };
    let (mut a, mut b) = (0i64, 0i64);
    // SAFETY: both descriptors are open; offsets point to i64s.
    let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut a, to.as_raw_fd(), &mut b, 4, 0) };
    if n < 0 {
        errno_of(-1)
    } else {
        format!("copied {n}")
    }
}

/// setuid/setgid are cleared by a write of another user: plain write,
/// copy_file_range, and a write while root holds the file open.
fn killpriv_steps(base: &Path) -> Vec<String> {
    let d = dir(&base.join("d"), 0, 0, 0o777);
    let src = file(&d.join("src"), 0, 0, 0o644, b"abcd");
    let mut out = Vec::new();
    for (name, how) in [
        ("write", 0),
        ("copy_file_range", 1),
        ("write-while-root-has-it-open", 2),
    ] {
        for mode in [0o4777, 0o6777] {
            let p = file(
                &d.join(format!("{name}-{mode:o}")),
                0,
                0,
                0o644,
                b"0123456789",
            );
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
            let held = (how == 2).then(|| fs::File::open(&p).expect("root opens"));
            let (p2, s2) = (p.clone(), src.clone());
            let r = nobody(move || {
                let f = fs::OpenOptions::new().write(true).open(&p2);
                let Ok(mut f) = f else {
                    return format!("open {}", res(f));
                };
                if how == 1 {
                    copy_range(&s2, &f)
                } else {
                    res(f.write_all(b"xx"))
                }
            });
            drop(held);
            out.push(format!("{name} {mode:o}: {r} -> {}", owner(&p)));
        }
    }
    out
}

#[test]
fn setuid_setgid_cleared_by_write_of_another_user_as_on_ext4() {
    same_on_both("killpriv", killpriv_steps);
}

/// Times before 1970 survive, to the nanosecond.
fn old_times_steps(base: &Path) -> Vec<String> {
    let f = file(&base.join("old"), 0, 0, 0o644, b"x");
    let r = utimes(&f, ts(-86400 * 365 * 10, 250_000_000), ts(-1, 500_000_000));
    let m = fs::metadata(&f).expect("stat");
    vec![
        r,
        format!("atime {} {}", m.atime(), m.atime_nsec()),
        format!("mtime {} {}", m.mtime(), m.mtime_nsec()),
    ]
}

#[test]
fn times_before_1970_as_on_ext4() {
    same_on_both("oldtimes", old_times_steps);
}

/// Supplementary groups are those of the calling thread, read for every
/// request: two threads of one process differ, and a thread that drops a
/// group loses it at once.
#[test]
fn groups_are_per_thread_and_never_stale() {
    let (_m, base) = thinfs("threads");
    let sg = dir(&base.join("sg"), 0, USERS, 0o2770);
    let (a, b) = (sg.clone(), sg.clone());
    let with = std::thread::spawn(move || member(move || res(fs::File::create(a.join("with")))));
    let without = std::thread::spawn(move || {
        run_as(USER, USER, &[], 0o022, move || {
            res(fs::File::create(b.join("without")))
        })
    });
    assert_eq!(with.join().unwrap(), "ok", "thread with group 100");
    assert_eq!(
        without.join().unwrap(),
        "errno 13",
        "thread without group 100"
    );
    let s = sg.clone();
    let (before, after) = member(move || {
        let before = res(fs::File::create(s.join("before-drop")));
        let _g = become_user(Identity {
            uid: USER,
            gid: USER,
            groups: Some(&[]),
            umask: None,
        })
        .expect("drop group");
        (before, res(fs::File::create(s.join("after-drop"))))
    });
    assert_eq!((before.as_str(), after.as_str()), ("ok", "errno 13"));
}

/// Snapshot roots hide lost+found as image roots do.
#[test]
fn snapshot_root_lists_like_its_image() {
    let (m, base) = thinfs("lostfound");
    fs::write(base.join("a"), b"a").expect("write");
    fs::create_dir(base.join(".snapshots/v1")).expect("snapshot");
    let names = |p: &Path| {
        let mut v: Vec<String> = fs::read_dir(p)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&base), vec!["a".to_string()]);
    assert_eq!(names(&m.path("base/.snapshots/v1")), names(&base));
}

/// The `n` lowest descriptor numbers free in process `pid`.
fn free_fd_numbers(pid: u32, n: usize) -> Vec<u64> {
    let used: std::collections::HashSet<u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).filter(|i| !used.contains(i)).take(n).collect()
}

/// Let the daemon open exactly `free` more descriptors.
fn limit_fds(pid: u32, free: usize) {
    let lim = free_fd_numbers(pid, free + 1)[free];
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={lim}:"))
        .status()
        .expect("prlimit")
        .success();
    assert!(ok, "prlimit");
}

/// The daemon's soft limit of descriptors.
fn soft_fd_limit(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/limits"))
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        .expect("open files limit")
}

fn restore_fds(pid: u32, soft: &str) {
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .status()
        .expect("prlimit")
        .success();
    assert!(ok, "prlimit");
}

/// A create-type request that fails leaves nothing behind, and the daemon
/// never follows a symlink: a link to `/proc/self/fd/N` left by a failed
/// request must not give nobody a file inside a 0700 directory.
#[test]
fn failed_create_leaves_nothing_and_no_symlink_is_followed() {
    let (m, base) = thinfs("nofollow");
    let sec = dir(&base.join("sec"), 0, 0, 0o700);
    file(&sec.join("s"), 0, 0, 0o644, b"secret");
    // Root reads it: the daemon now holds a descriptor of it.
    assert_eq!(fs::read(sec.join("s")).expect("root reads"), b"secret");
    let pid = m.pid();
    let n = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| e.ok())
        .find(|e| {
            fs::read_link(e.path())
                .map(|l| l.ends_with("sec/s"))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("daemon descriptor of sec/s");
    let w = dir(&base.join("w"), 0, 0, 0o777);
    let w2 = w.clone();
    nobody(move || fs::write(w2.join("own"), b"mine").expect("own file"));
    // Cache "no such entry" for the names, as a failed request would.
    let names = |k: usize| ["l", "d", "p", "h", "c"].map(|n| format!("{n}{k}"));
    for k in 0..4 {
        for n in names(k) {
            assert!(fs::symlink_metadata(w.join(n)).is_err());
        }
    }
    // With 0..3 descriptors left, each create-type request either works or
    // leaves nothing behind.
    let soft = soft_fd_limit(pid);
    let mut made = vec!["own".to_string()];
    let mut results = Vec::new();
    for op in 0..5 {
        for k in 0..4 {
            let (w3, target, n) = (
                w.clone(),
                format!("/proc/self/fd/{n}"),
                names(k)[op].clone(),
            );
            limit_fds(pid, k);
            let r = nobody(move || match op {
                0 => res(symlink(&target, w3.join(&n))),
                1 => res(fs::create_dir(w3.join(&n))),
                2 => {
                    let c = cpath(&w3.join(&n));
                    // SAFETY: c is a valid C string.
                    errno_of(unsafe { libc::mknod(c.as_ptr(), libc::S_IFIFO | 0o666, 0) })
                }
                3 => res(fs::hard_link(w3.join("own"), w3.join(&n))),
                _ => res(fs::File::create(w3.join(&n))),
            });
            restore_fds(pid, &soft);
            let n = names(k)[op].clone();
            if r == "ok" {
                made.push(n.clone());
            }
            results.push(format!("{n}: {r}"));
        }
    }
    eprintln!("requests with the daemon short of descriptors: {results:?}");
    let mut listed: Vec<String> = fs::read_dir(&w)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    made.sort();
    assert_eq!(
        listed, made,
        "left behind after failed requests: {results:?}"
    );
    assert!(
        results.iter().any(|r| !r.ends_with("ok")),
        "no request failed: the test proved nothing"
    );
    // An open(O_CREAT) of a name the kernel believes missing must never
    // follow a symlink in the daemon.
    for k in 0..4 {
        let (w5, s2) = (w.join(format!("l{k}")), sec.clone());
        let (direct, via) = nobody(move || {
            let direct = res(fs::read(s2.join("s")));
            let mut got = Vec::new();
            let via = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CREAT)
                .mode(0o644)
                .open(&w5)
                .and_then(|mut f| f.read_to_end(&mut got).map(|_| got));
            (direct, via)
        });
        assert_eq!(direct, "errno 13", "nobody reads sec/s directly");
        assert_ne!(
            via.as_deref().ok(),
            Some(&b"secret"[..]),
            "nobody read sec/s through l{k}, a symlink followed by the daemon"
        );
    }
}
