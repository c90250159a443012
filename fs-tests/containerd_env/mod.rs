//! The world of the containerd tests: an OCI image built offline, a
//! containerd of the test's own (root, state, sockets in a scratch
//! directory, thinfs as its proxy snapshotter), and probes of the pool
//! (records, loop devices, space) and of the daemon's log.
#![allow(dead_code)]

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "docker.io/library/thinfs-test:1";

pub fn sh(script: &str) -> String {
    let o = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .output()
        .expect("run bash");
    assert!(
        o.status.success(),
        "script failed: {script}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Build an OCI image tarball in `dir`: layer 1 has /bin/busybox (static),
/// /bin/sh, /etc/keep and /etc/gone; layer 2 adds /etc/added and whites
/// out /etc/gone.
pub fn build_image(dir: &Path) -> PathBuf {
    let d = dir.display();
    sh(&format!(
        r#"
cd {d}
rm -rf img l1 l2; mkdir -p img/blobs/sha256 l1/bin l1/etc l1/tmp l2/etc
cp /bin/busybox l1/bin/busybox
ln -s busybox l1/bin/sh
echo keep > l1/etc/keep
echo gone > l1/etc/gone
echo "from layer two" > l2/etc/added
: > l2/etc/.wh.gone
blob() {{ local h; h=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" img/blobs/sha256/$h; echo $h; }}
tar --numeric-owner --owner=0 --group=0 -C l1 -cf layer1.tar .
tar --numeric-owner --owner=0 --group=0 -C l2 -cf layer2.tar .
s1=$(stat -c %s layer1.tar); s2=$(stat -c %s layer2.tar)
h1=$(blob layer1.tar); h2=$(blob layer2.tar)
printf '{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]}}}}' $h1 $h2 > config.json
sc=$(stat -c %s config.json); hc=$(blob config.json)
printf '{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}}]}}' $hc $sc $h1 $s1 $h2 $s2 > manifest.json
sm=$(stat -c %s manifest.json); hm=$(blob manifest.json)
printf '{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{{"io.containerd.image.name":"{IMAGE}","org.opencontainers.image.ref.name":"1"}}}}]}}' $hm $sm > img/index.json
echo '{{"imageLayoutVersion":"1.0.0"}}' > img/oci-layout
tar -C img -cf image.tar oci-layout index.json blobs
"#
    ));
    dir.join("image.tar")
}

/// A containerd of the test's own (root, state, sockets in `dir`), with
/// thinfs as the proxy snapshotter `thinfs`; killed (with its shims) on drop.
pub struct Containerd {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    pub fn start(dir: &Path, snap_sock: &Path) -> Containerd {
        let d = dir.display();
        let cfg = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/ctd.sock"
[ttrpc]
  address = "{d}/ctd.ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[proxy_plugins.thinfs]
  type = "snapshot"
  address = "{}"
"#,
            snap_sock.display()
        );
        std::fs::create_dir_all(dir).expect("containerd dir");
        std::fs::write(dir.join("config.toml"), cfg).expect("containerd config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let t = Instant::now();
        while t.elapsed() < HANG {
            if c.ctr(&["version"]).status.success() {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("containerd did not come up: {}", c.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("ctd.sock"))
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// `ctr ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Where the rootfs of container `id` is mounted (by containerd's
    /// shim, in this mount namespace), if it is.
    pub fn rootfs(&self, id: &str) -> Option<PathBuf> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        let under = format!("{}/", self.dir.display());
        let end = format!("/{id}/rootfs");
        mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .find(|p| p.starts_with(&under) && p.ends_with(&end))
            .map(PathBuf::from)
    }

    /// `ctr run --rm` of the test image with `cmd`.
    pub fn run(&self, id: &str, cmd: &str) -> Output {
        let fifo = self.dir.join("fifo");
        let runc = self.dir.join("runc");
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("ctd.sock"))
            .args(["run", "--snapshotter", "thinfs", "--rm", "--fifo-dir"])
            .arg(&fifo)
            .arg("--runc-root")
            .arg(&runc)
            .args([IMAGE, id, "/bin/sh", "-c", cmd])
            .output()
            .expect("ctr run")
    }
}

impl Containerd {
    /// `ctr images import --snapshotter thinfs TAR`, which must succeed.
    pub fn import(&self, tar: &Path) {
        self.ok(&[
            "images",
            "import",
            "--snapshotter",
            "thinfs",
            &tar.to_string_lossy(),
        ]);
    }

    /// [`Containerd::run`] with ids `PREFIX-N`, tried again while containerd
    /// has not reached thinfs yet ([`unreachable`]: it redials a restarted
    /// proxy with a backoff), for up to `limit`. The last output and the
    /// number of tries.
    pub fn run_when_reachable(&self, prefix: &str, cmd: &str, limit: Duration) -> (Output, usize) {
        let t = Instant::now();
        let mut n = 0;
        loop {
            n += 1;
            let o = self.run(&format!("{prefix}-{n}"), cmd);
            let err = String::from_utf8_lossy(&o.stderr);
            if o.status.success() || !unreachable(&err) || t.elapsed() > limit {
                return (o, n);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Its tasks' processes (by pid, as `ctr tasks ls` shows them), then
        // the shims it started, which name its address in their command
        // line, then containerd itself.
        let tasks = self.ctr(&["tasks", "ls"]);
        for l in String::from_utf8_lossy(&tasks.stdout).lines().skip(1) {
            if let Some(pid) = l.split_whitespace().nth(1).filter(|p| *p != "0") {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let addr = self.dir.join("ctd.sock").display().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains("containerd-shim") && cmd.contains(&addr) {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            for _ in 0..100 {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Mounts containerd may have left in its state directory.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}/[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.display()
            ))
            .status();
    }
}

/// Loop devices attached to this pool's device files.
pub fn pool_loops(m: &TestMount) -> usize {
    let pool = m.state.join("pool.img").to_string_lossy().into_owned();
    let all = thinfs::sys::loopdev::attached();
    let Some(p) = all.iter().find(|l| l.backing_file == pool) else {
        return 0;
    };
    all.iter().filter(|l| l.backing_dev == p.own_dev).count()
}

/// `thinfs list -t all --json` rows.
pub fn list_all(m: &TestMount) -> Vec<serde_json::Value> {
    let o = m.cli(&["list", "-t", "all", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("list json")
}

pub fn containerd_rows(m: &TestMount) -> Vec<serde_json::Value> {
    list_all(m)
        .into_iter()
        .filter(|r| r["kind"] == "containerd")
        .collect()
}

pub fn pool_used(m: &TestMount) -> u64 {
    let o = m.cli(&["pool", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("pool json");
    v["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("no used in {v}"))
}

/// Wait until the pool's `used` is back within 1 MiB of `before`: thinfs
/// drops a record before it deletes and trims the device, so the space
/// comes back a moment after the snapshot count drops.
pub fn wait_space_back(m: &TestMount, before: u64) {
    let t = Instant::now();
    loop {
        let after = pool_used(m);
        if after <= before + (1 << 20) {
            return;
        }
        assert!(
            t.elapsed() < HANG,
            "pool used {before} before, {after} after"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until `f` holds (up to [`HANG`], which only ends a hang).
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < HANG {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

/// Wait until containerd's garbage collector has done what `done` checks.
/// containerd 1.6 lets a removal that lands while a collection runs wait
/// for the next trigger, which may never come in a test: every 5 s without
/// `done`, [`gc_kick`] runs one more collection.
pub fn gc_wait(ctd: &Containerd, m: &TestMount, what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    let mut kick = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < HANG,
            "timed out waiting until {what}; containerd calls:\n{}",
            calls(m)
        );
        std::thread::sleep(Duration::from_millis(100));
        if kick.elapsed() > Duration::from_secs(5) {
            eprintln!("{what}: containerd's GC stalled: kicking it");
            gc_kick(ctd);
            kick = Instant::now();
        }
    }
}

/// Make containerd collect garbage now: a lease created and deleted with
/// `--sync` runs a collection and waits for it. It adds nothing that
/// thinfs would hold. Its outcome is not checked: the collection may fail
/// on purpose (a daemon killed in Remove), and the caller checks what it
/// waits for.
pub fn gc_kick(ctd: &Containerd) {
    static KICKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = KICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("gc-kick-{n}");
    let o = ctd.ctr(&["--timeout", "60s", "leases", "create", "--id", &id]);
    if !o.status.success() {
        eprintln!("gc kick: {}", String::from_utf8_lossy(&o.stderr).trim());
        return;
    }
    let o = ctd.ctr(&["--timeout", "60s", "leases", "delete", "--sync", &id]);
    if !o.status.success() {
        eprintln!("gc kick: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
}

/// The snapshotter calls the daemon logged.
pub fn calls(m: &TestMount) -> String {
    let log = m.log();
    let v: Vec<&str> = log.lines().filter(|l| l.contains("containerd")).collect();
    v.join("\n")
}

/// Devices (records) of containerd's in the pool.
pub fn layer_count(m: &TestMount) -> usize {
    containerd_rows(m).len()
}

/// `ctr snapshots --snapshotter thinfs ARGS`.
/// containerd redials a restarted proxy with a backoff: a call that fails
/// with a connection error or on a connection the old daemon closed (it
/// never reached thinfs) is tried again.
pub fn snap(ctd: &Containerd, args: &[&str]) -> Output {
    let t = Instant::now();
    loop {
        let o = snap_once(ctd, args);
        let err = String::from_utf8_lossy(&o.stderr);
        if !unreachable(&err) || t.elapsed() > HANG {
            return o;
        }
        eprintln!(
            "ctr {args:?}: thinfs not reached yet, trying again: {}",
            err.trim()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// [`snap`], which must succeed: a failure shows what ctr said.
pub fn snap_ok(ctd: &Containerd, args: &[&str]) -> Output {
    let o = snap(ctd, args);
    assert!(
        o.status.success(),
        "ctr snapshots {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `ctr snapshots view KEY PARENT`, kept from containerd's garbage
/// collector. ctr labels what it prepares or commits as a GC root, but not
/// a view: the next collection removes it (the device went away under a
/// test's own mount of it, once in about 15 runs, right after the many
/// removals that schedule collections). A collection is run first, so none
/// is due between the view and its root label.
pub fn view_kept(ctd: &Containerd, key: &str, parent: &str) {
    gc_kick(ctd);
    snap_ok(ctd, &["view", key, parent]);
    snap_ok(ctd, &["label", key, "containerd.io/gc.root=thinfs-test"]);
}

/// One `ctr snapshots` call, not retried: for a call that is meant to
/// kill the daemon (a failpoint), where retrying would only wait.
pub fn snap_once(ctd: &Containerd, args: &[&str]) -> Output {
    let mut a = vec!["snapshots", "--snapshotter", "thinfs"];
    a.extend_from_slice(args);
    ctd.ctr(&a)
}

/// Did containerd fail to reach thinfs at all (gRPC code Unavailable), as
/// it does for a while after the daemon restarts? containerd's proxy
/// client does not wait for its connection to be ready: the first call
/// after a restart may go out on the dead connection ("write: broken
/// pipe") or while it is dialing again ("connection error"). Those calls
/// never reached thinfs, so trying again is what a client would do.
pub fn unreachable(err: &str) -> bool {
    [
        "connection error",
        "connection closed",
        "broken pipe",
        "connection reset",
        "transport is closing",
        "unavailable",
    ]
    .iter()
    .any(|w| err.contains(w))
}

/// Restart the daemon (no failpoint). `snap` waits until containerd
/// reaches it again.
pub fn restart(m: &mut TestMount) {
    m.kill9();
    m.wrapper.clear();
    m.spawn();
}

/// How many `op` calls on keys containing `key` the daemon logged as done.
pub fn ms_count(log: &str, op: &str, key: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains(&format!("containerd: {op} ")) && l.contains(key) && !l.contains(" failed ")
        })
        .count()
}

/// Has process `pid` (our child, not reaped yet) ended?
pub fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(st) => st
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Keys containerd sees, with their kind.
pub fn snap_keys(ctd: &Containerd) -> Vec<(String, String)> {
    let o = snap(ctd, &["ls"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.to_string(), f.last()?.to_string()))
        })
        .collect()
}

/// The containerd tests take turns: each runs its own containerd, but
/// containerd 1.6 keeps its shim sockets in one machine-wide directory
/// and its GC timing stretches under the load of a second one (a crash
/// test timed out waiting for the GC while the run test ran beside it).
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}
