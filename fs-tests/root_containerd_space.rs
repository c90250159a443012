//! containerd's devices under the space guard, and seen by `thinfs info`,
//! with Debian's real containerd and runc (see `root_containerd.rs`): a
//! container that writes until the pool is full gets ENOSPC, its ext4 and
//! the users' images stay clean, Prepare is refused below the reserve, and
//! everything works again once the container's snapshot is removed.

mod common;
mod containerd_env;

use common::*;
use containerd_env::*;
use serde_json::Value;
use std::process::{Command, Output};
use std::time::Instant;

/// The daemon with its mount flags changed by a shell wrapper: TestMount
/// passes `--pool-size 8G --image-size 1G --reserve 64M`, and clap refuses
/// the same flag twice.
fn start(tag: &str, sock: &str, pool: &str, image: &str, reserve: &str) -> TestMount {
    let script = format!(
        r#"bin="$1"; shift; n=$#; prev=
while [ "$n" -gt 0 ]; do a="$1"; shift; n=$((n-1))
  case "$prev" in --pool-size) a={pool};; --image-size) a={image};; --reserve) a={reserve};; esac
  prev="$a"; set -- "$@" "$a"
done
exec "$bin" "$@""#
    );
    TestMount::start_wrapped(
        tag,
        &["sh", "-c", &script, "thinfs-wrapper"],
        &["--containerd-socket", sock],
    )
}

fn pool(m: &TestMount) -> Value {
    let o = m.cli(&["pool", "--json"]);
    assert!(o.status.success(), "thinfs pool --json: {o:?}");
    serde_json::from_slice(&o.stdout).expect("pool json")
}

fn info(m: &TestMount, name: &str) -> Value {
    let o = m.cli(&["info", name, "--json"]);
    assert!(
        o.status.success(),
        "thinfs info {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("info json")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ctr run` of the test image without `--rm`: the container and its
/// snapshot stay after it ends.
fn run_keep(ctd: &Containerd, id: &str, cmd: &str) -> Output {
    Command::new("ctr")
        .arg("--address")
        .arg(ctd.dir.join("ctd.sock"))
        .args(["run", "--snapshotter", "thinfs", "--fifo-dir"])
        .arg(ctd.dir.join("fifo"))
        .arg("--runc-root")
        .arg(ctd.dir.join("runc"))
        .args([IMAGE, id, "/bin/sh", "-c", cmd])
        .output()
        .expect("ctr run")
}

/// The committed layer that has a parent (the image's top layer).
fn top_key(ctd: &Containerd) -> String {
    snap_keys(ctd)
        .into_iter()
        .map(|(k, _)| k)
        .find(|k| {
            let o = snap(ctd, &["info", k]);
            String::from_utf8_lossy(&o.stdout).contains("\"Parent\"")
        })
        .expect("the top layer's key")
}

/// `thinfs info ctd-N` resolves containerd's devices (as `list -t
/// containerd` names them) and shows containerd's key, kind, parent and
/// usage; the changing verbs still do not reach them.
#[test]
fn root_containerd_info_names_layers() {
    let _turn = one_at_a_time();
    let dir = Scratch::new("ctdinfo");
    let snap_sock = dir.path().join("snap.sock");
    let sock = snap_sock.to_string_lossy().into_owned();
    let m = TestMount::start_with("ctdinfofs", &["--containerd-socket", &sock]);
    let tar = build_image(dir.path());
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    ctd.import(&tar);
    let top = top_key(&ctd);
    assert!(
        snap(&ctd, &["prepare", "info-active", &top])
            .status
            .success()
    );

    let o = m.cli(&["list", "-t", "containerd", "-H", "-o", "name"]);
    assert!(o.status.success(), "{}", text(&o));
    let names: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(names.len(), 3, "two layers and one active: {names:?}");
    let mut kinds = Vec::new();
    for n in &names {
        let i = info(&m, n);
        assert_eq!(i["full_name"], n.as_str(), "{i}");
        assert_eq!(i["kind"], "containerd", "{i}");
        let key = i["containerd"]["key"].as_str().expect("key").to_string();
        let kind = i["containerd"]["kind"].as_str().expect("kind").to_string();
        assert!(i["usage"]["mapped"].as_u64().is_some(), "usage: {i}");
        // The text form names the key and the kind too.
        let o = m.cli(&["info", n]);
        assert!(o.status.success(), "{}", text(&o));
        let t = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(t.contains(&format!("ctd-key    {key}")), "{t}");
        assert!(t.contains(&format!("ctd-kind   {kind}")), "{t}");
        if key.ends_with("/info-active") || key == "info-active" {
            assert_eq!(kind, "active", "{i}");
            // Its parent is the top layer's device.
            let parent = i["parent_name"].as_str().expect("parent").to_string();
            let p = info(&m, &parent);
            let pk = p["containerd"]["key"].as_str().unwrap();
            assert!(pk.ends_with(&format!("/{top}")), "{top} vs {p}");
        }
        kinds.push(kind);
    }
    kinds.sort();
    assert_eq!(kinds, ["active", "committed", "committed"]);
    // Inspection only: users' verbs still refuse them, and a name that
    // is no device of containerd's is still not found.
    let o = m.cli(&["destroy", &names[0]]);
    assert!(!o.status.success(), "destroy of {} refused", names[0]);
    let o = m.cli(&["info", "ctd-999999"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no image named ctd-999999"),
        "{}",
        text(&o)
    );
}

/// A container writing until the pool is full gets ENOSPC in write()
/// (the guard caps the ext4 containerd mounted, as it does for images):
/// no aborted journal in the container's filesystem or in a user's image,
/// Prepare refused (ResourceExhausted, logged) below the reserve, and all
/// writable again once the container's snapshot is removed.
#[test]
fn root_containerd_container_filling_the_pool_gets_enospc() {
    let _turn = one_at_a_time();
    let dir = Scratch::new("ctdspace");
    let snap_sock = dir.path().join("snap.sock");
    let sock = snap_sock.to_string_lossy().into_owned();
    let m = start("ctdspacefs", &sock, "2G", "4G", "512M");
    let p = pool(&m);
    assert!(
        p["total"].as_u64().unwrap() < 3 << 30,
        "a 2G XFS pool file: {p}"
    );
    // A user's image with data, mounted and written to around the fill.
    std::fs::create_dir(m.path("other")).expect("mkdir other");
    let keep = pattern(64 << 20, 7);
    std::fs::write(m.path("other/keep"), &keep).expect("write other/keep");

    let tar = build_image(dir.path());
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    ctd.import(&tar);
    let top = top_key(&ctd);

    // 4G of zeros into a 4G ext4 on a 2G pool.
    let t = Instant::now();
    let o = run_keep(
        &ctd,
        "fill",
        "dd if=/dev/zero of=/tmp/fill bs=1M 2>&1; echo dd-exit=$?; sync; echo synced",
    );
    let out = text(&o);
    eprintln!("fill: {:.1} s: {out}", t.elapsed().as_secs_f64());
    assert!(o.status.success(), "ctr run: {out}\n{}", calls(&m));
    assert!(
        out.contains("No space left on device"),
        "the container's write() got ENOSPC: {out}"
    );
    assert!(out.contains("synced"), "{out}");
    assert!(!out.contains("Read-only"), "no aborted journal: {out}");
    let log = m.log();
    assert!(log.contains("pool full"), "the guard logged the full pool");
    assert!(
        log.contains("now guarding containerd snapshot"),
        "the guard watched containerd's mount"
    );
    assert!(!log.contains("ext4 reports"), "no ext4 errors anywhere");
    // The container ended (its ext4 unmounted): the guard counts its
    // margins no more, but the pool stays below the reserve.
    let p = pool(&m);
    assert!(
        p["available"].as_u64().unwrap() < p["reserve"].as_u64().unwrap(),
        "{p}"
    );

    // Below the reserve: containerd's Prepare is refused, clearly.
    let o = snap(&ctd, &["prepare", "refused", &top]);
    assert!(!o.status.success(), "prepare refused on a full pool");
    assert!(text(&o).contains("below the reserve"), "{}", text(&o));
    assert!(
        m.log().contains("containerd: refused prepare"),
        "the refusal is logged"
    );

    // The container's filesystem (its task ended: unmounted, still
    // attached) is clean: e2fsck -n finds nothing.
    let active: Vec<String> = snap_keys(&ctd)
        .into_iter()
        .filter(|(_, k)| k == "Active")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(active, ["fill"], "{active:?}");
    let mounts =
        String::from_utf8_lossy(&snap(&ctd, &["mounts", "/x", "fill"]).stdout).into_owned();
    let dev = mounts
        .split_whitespace()
        .find(|w| w.starts_with("/dev/loop"))
        .unwrap_or_else(|| panic!("a loop device in {mounts}"))
        .to_string();
    let fsck = Command::new("e2fsck")
        .args(["-fn", &dev])
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "the container's ext4 is clean: {}",
        text(&fsck)
    );

    // Free the space: the container goes, containerd's GC removes its
    // snapshot; the pool leaves full, the user's image takes writes again
    // and fsck finds it clean, and Prepare works again.
    ctd.ok(&["containers", "rm", "fill"]);
    gc_wait(&ctd, &m, "the container's snapshot is removed", || {
        layer_count(&m) == 2
    });
    wait_until("the pool is no longer full", || pool(&m)["state"] != "full");
    std::fs::write(m.path("other/after"), pattern(32 << 20, 9)).expect("write after the fill");
    assert_eq!(std::fs::read(m.path("other/keep")).unwrap(), keep);
    let o = m.cli(&["fsck", "other"]);
    assert!(o.status.success(), "fsck other: {}", text(&o));
    assert!(
        snap(&ctd, &["prepare", "again", &top]).status.success(),
        "prepare works again"
    );
    assert!(snap(&ctd, &["rm", "again"]).status.success());
    let log = m.log();
    assert!(log.contains("pool no longer full"), "logged");
    assert!(!log.contains("ext4 reports"), "no ext4 errors anywhere");
}

/// 8 callers at once straight on thinfs's socket (`examples/snapbench`):
/// Prepare on the same parent + Mounts + Remove of their own keys. Every
/// call succeeds, and nothing is left attached or recorded.
#[test]
fn root_containerd_concurrent_calls() {
    let _turn = one_at_a_time();
    let dir = Scratch::new("ctdconc");
    let snap_sock = dir.path().join("snap.sock");
    let sock = snap_sock.to_string_lossy().into_owned();
    let m = TestMount::start_with("ctdconcfs", &["--containerd-socket", &sock]);
    let tar = build_image(dir.path());
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    ctd.import(&tar);
    let rows = containerd_rows(&m);
    let top = rows
        .iter()
        .find(|r| r["parent"].is_u64())
        .and_then(|r| r["containerd"]["key"].as_str())
        .expect("the top layer's thinfs-side key")
        .to_string();
    // containerd's garbage collector removes the proxy's snapshots it does
    // not know (these keys are the bench's own): it goes first.
    drop(ctd);
    let bench = thinfs_bin()
        .parent()
        .expect("target dir")
        .join("examples/snapbench");
    let child = Command::new(&bench)
        .arg(&snap_sock)
        .args(["-", &top, "5", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run examples/snapbench (built by cargo test)");
    let o = child.wait_with_output().expect("snapbench");
    assert!(o.status.success(), "snapbench: {}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).expect("snapbench json");
    assert_eq!(r["rounds"], 40, "{r}");
    eprintln!("8 callers on thinfs's socket: {r}");
    let log = m.log();
    assert_eq!(ms_count(&log, "prepare", "snapbench-"), 40);
    assert_eq!(ms_count(&log, "remove", "snapbench-"), 40);
    assert_eq!(layer_count(&m), 2, "every bench snapshot removed");
    wait_until("nothing left attached", || pool_loops(&m) == 0);
}
