//! `thinfs send | thinfs receive` through the CLI between two daemons with
//! their own pools, state directories and sockets: full, incremental with
//! `--haves`, up to date, refusals (terminal, garbage, a caller who is not
//! root), and the trees compared file by file through both mounts.

mod common;

use common::*;
use std::process::Command;

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

fn ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn fails(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(!o.status.success(), "{cmd} should fail");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Everything about a tree that a round trip must keep: type, mode, owner,
/// size, link count, link target, content digest and xattrs of each entry.
fn tree(dir: &std::path::Path) -> String {
    let d = dir.display();
    ok(&format!(
        "cd {d} && find . -path ./lost+found -prune -o -printf '%y %m %U %G %s %n %l %p\\n' | sort && \
         find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 -r md5sum && \
         getfattr -R -h -d -m '.*' . 2>/dev/null | grep -v '^$' || true"
    ))
}

fn fill(dir: &std::path::Path, seed: u64) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/data.bin"), pattern(3 << 20, seed)).unwrap();
    std::fs::write(dir.join(format!("f{seed}")), format!("file {seed}\n")).unwrap();
    let d = dir.display();
    ok(&format!(
        "cd {d} && ln -sf sub/data.bin link && ln -f f{seed} hard{seed} && chown 1234:100 f{seed} && \
         chmod 0640 f{seed} && setfattr -n user.tag -v v{seed} sub/data.bin"
    ));
}

#[test]
fn root_send_receive_cli_between_two_daemons() {
    let a = TestMount::start("send-a");
    let b = TestMount::start("send-b");
    let (sa, sb) = (a.cli_sh(""), b.cli_sh(""));
    std::fs::create_dir(a.path("base")).unwrap();
    fill(&a.path("base"), 1);
    std::fs::create_dir(a.path("base/.snapshots/v1")).unwrap();

    // Full stream: a new image with the same snapshot name and identity.
    let out = ok(&format!("{sa} send base@v1 | {sb} receive copy"));
    assert!(out.contains("received copy@v1 (new image)"), "{out}");
    assert_eq!(
        tree(&a.path("base/.snapshots/v1")),
        tree(&b.path("copy/.snapshots/v1"))
    );
    assert_eq!(tree(&a.path("base/.snapshots/v1")), tree(&b.path("copy")));
    let ha = ok(&format!("{sa} haves base --json"));
    let hb = ok(&format!("{sb} haves copy --json"));
    let id = |h: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(h).unwrap();
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{} {}", s["name"], s["id"]))
            .collect()
    };
    assert_eq!(id(&ha), id(&hb), "the received snapshot keeps its identity");
    assert!(ok(&format!("{sb} haves copy")).contains("v1"));

    // Incremental with --haves: the base is the newest snapshot b has.
    fill(&a.path("base"), 2);
    std::fs::remove_file(a.path("base/f1")).unwrap();
    std::fs::create_dir(a.path("base/.snapshots/v2")).unwrap();
    let haves = b.scratch.path().join("haves.json");
    ok(&format!("{sb} haves copy --json > {}", haves.display()));
    let out = ok(&format!(
        "{sa} send --haves {} base@v2 | {sb} receive copy",
        haves.display()
    ));
    assert!(out.contains("incremental from v1"), "{out}");
    assert!(out.contains("received copy@v2 (incremental)"), "{out}");
    assert_eq!(
        tree(&a.path("base/.snapshots/v2")),
        tree(&b.path("copy/.snapshots/v2"))
    );
    assert_eq!(tree(&a.path("base/.snapshots/v2")), tree(&b.path("copy")));

    // The receiver has v2 now: up to date, nothing written.
    ok(&format!("{sb} haves copy --json > {}", haves.display()));
    let stream = b.scratch.path().join("none.stream");
    let out = ok(&format!(
        "{sa} send --haves {} base@v2 > {}",
        haves.display(),
        stream.display()
    ));
    assert!(out.contains("up to date"), "{out}");
    assert_eq!(std::fs::metadata(&stream).unwrap().len(), 0);

    // A stream sent again is refused: the receiver has that snapshot.
    let out = fails(&format!("{sa} send -i v1 base@v2 | {sb} receive copy"));
    assert!(out.contains("copy") && out.contains("v2"), "{out}");

    // Garbage is refused and leaves nothing.
    let before = ok(&format!("{sb} list -t all -H -o name"));
    let out = fails(&format!("head -c 100000 /dev/urandom | {sb} receive junk"));
    assert!(out.contains("bad stream"), "{out}");
    assert_eq!(ok(&format!("{sb} list -t all -H -o name")), before);

    // A new image's name follows the rules of new names: no leading `-`
    // (reserved for the daemon's own temporary devices).
    let out = fails(&format!(
        "{sa} send -q base@v1 | {sb} receive -- -thinfs-restore-1-1"
    ));
    assert!(out.contains("invalid name"), "{out}");
    assert_eq!(ok(&format!("{sb} list -t all -H -o name")), before);

    // Streams never go to or come from a terminal.
    let out = fails(&format!("script -qec '{sa} send base@v1' /dev/null"));
    assert!(out.contains("terminal"), "{out}");
    let out = fails(&format!("script -qec '{sb} receive other' /dev/null"));
    assert!(out.contains("terminal"), "{out}");

    // Receiving needs root: an unprivileged caller is refused, with why.
    let file = b.scratch.path().join("v1.stream");
    ok(&format!("{sa} send -q base@v1 > {}", file.display()));
    ok(&format!("chmod 0644 {}", file.display()));
    let (good, out) = as_nobody(&format!("{} < {}", b.cli_sh("receive nob"), file.display()));
    assert!(!good, "{out}");
    assert!(
        out.contains("needs root") && out.contains("setuid"),
        "{out}"
    );
    // Sending needs root or the admin group.
    let (good, out) = as_nobody(&format!("{} > /dev/null", a.cli_sh("send base@v1")));
    assert!(!good, "{out}");
    assert!(out.contains("permission denied"), "{out}");
    // ... and the saved stream still makes an identical image for root.
    ok(&format!("{sb} receive again < {}", file.display()));
    assert_eq!(tree(&a.path("base/.snapshots/v1")), tree(&b.path("again")));
}

/// A received image that is merely mounted stays "unchanged since its
/// newest snapshot": ext4's background inode-table zeroing (lazyinit, which
/// a mount of an mkfs'ed-with-lazy_itable_init filesystem starts within
/// seconds) must not run on thinfs's mounts, or the next incremental
/// receive is refused ("changed ... at byte 4114", group 0's bg_flags).
#[test]
fn root_send_mounted_image_stays_unchanged_for_the_next_incremental() {
    let a = TestMount::start("lazy-a");
    let b = TestMount::start("lazy-b");
    let (sa, sb) = (a.cli_sh(""), b.cli_sh(""));
    ok(&format!("{sa} create --size 4G base"));
    fill(&a.path("base"), 1);
    std::fs::create_dir(a.path("base/.snapshots/v1")).unwrap();
    ok(&format!("{sa} send -q base@v1 | {sb} receive -q copy"));
    // Mounted on the receiver and left alone long enough for lazyinit to
    // start (it waits up to 5 s, then zeroes a group per run).
    assert!(b.path("copy/f1").exists());
    std::thread::sleep(std::time::Duration::from_secs(12));
    fill(&a.path("base"), 2);
    std::fs::create_dir(a.path("base/.snapshots/v2")).unwrap();
    let out = ok(&format!(
        "{sa} send -q -i v1 base@v2 | {sb} receive -q copy"
    ));
    assert!(!out.contains("changed"), "{out}");
    assert_eq!(tree(&a.path("base/.snapshots/v2")), tree(&b.path("copy")));
}

/// A panic in a stream's worker thread (the send side's device reader, the
/// receive side's decoder) fails that stream: the sender never ends a cut
/// stream with a valid end record, and the receiver never publishes what
/// reached it before the decoder died (it used to ignore the panic and take
/// the early end of its channel for the end of the stream).
#[test]
fn root_send_a_panic_in_a_worker_fails_the_stream() {
    let a = TestMount::start_wrapped(
        "send-panic-a",
        &["env", "THINFS_FAILPOINT=send.reader-panic"],
        &[],
    );
    let b = TestMount::start_wrapped(
        "send-panic-b",
        &["env", "THINFS_FAILPOINT=receive.decoder-panic"],
        &[],
    );
    let c = TestMount::start("send-panic-c");
    let (sa, sb, sc) = (a.cli_sh(""), b.cli_sh(""), c.cli_sh(""));
    for m in [&a, &c] {
        std::fs::create_dir(m.path("base")).unwrap();
        fill(&m.path("base"), 1);
        std::fs::create_dir(m.path("base/.snapshots/v1")).unwrap();
    }
    // The sender's reader panics: the stream is cut, never closed as whole.
    let s = Scratch::new("send-panic-file");
    let file = s.path().join("s.stream");
    let out = fails(&format!("{sa} send base@v1 > {}", file.display()));
    assert!(out.contains("panicked"), "{out}");
    let out = fails(&format!("{sc} receive cut < {}", file.display()));
    assert!(out.contains("bad stream"), "a cut stream was taken: {out}");
    // The receiver's decoder panics after its first record: nothing is
    // published, nothing is left.
    let out = fails(&format!("{sc} send base@v1 | {sb} receive copy"));
    assert!(out.contains("panicked"), "{out}");
    let l = ok(&format!("{sb} list -t all -H -o name"));
    assert!(l.trim().is_empty(), "the receive left {l}");
    assert!(!b.path("copy").exists());
    // Both daemons go on.
    ok(&format!("{sa} list"));
    ok(&format!("{sb} create other"));
}
