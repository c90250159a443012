//! thinfs as containerd's snapshotter, with Debian's real containerd and
//! runc: an OCI image built here (a static busybox layer, then a layer with
//! a new file and a whiteout), imported into thinfs, run, removed; a
//! kill -9 of the daemon while containerd runs; the layers seen (and
//! snapshotted) through the thinfs CLI.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const IMAGE: &str = "docker.io/library/thinfs-test:1";

fn sh(script: &str) -> String {
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
fn build_image(dir: &Path) -> PathBuf {
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
struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    fn start(dir: &Path, snap_sock: &Path) -> Containerd {
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
        for _ in 0..200 {
            if c.ctr(&["version"]).status.success() {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("containerd did not come up: {}", c.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("ctd.sock"))
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// `ctr ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `ctr run --rm` of the test image with `cmd`.
    fn run(&self, id: &str, cmd: &str) -> Output {
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

impl Drop for Containerd {
    fn drop(&mut self) {
        // The shims this containerd started name its address in their
        // command line: end those (by pid) and containerd itself.
        let addr = self.dir.join("ctd.sock").display().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains("containerd-shim") && cmd.contains(&addr) {
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
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
fn pool_loops(m: &TestMount) -> usize {
    let pool = m.state.join("pool.img").to_string_lossy().into_owned();
    let all = thinfs::sys::loopdev::attached();
    let Some(p) = all.iter().find(|l| l.backing_file == pool) else {
        return 0;
    };
    all.iter().filter(|l| l.backing_dev == p.own_dev).count()
}

/// `thinfs list -t all --json` rows.
fn list_all(m: &TestMount) -> Vec<serde_json::Value> {
    let o = m.cli(&["list", "-t", "all", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("list json")
}

fn containerd_rows(m: &TestMount) -> Vec<serde_json::Value> {
    list_all(m)
        .into_iter()
        .filter(|r| r["kind"] == "containerd")
        .collect()
}

fn pool_used(m: &TestMount) -> u64 {
    let o = m.cli(&["pool", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("pool json");
    v["used"].as_u64().unwrap_or_else(|| panic!("no used in {v}"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

/// The snapshotter calls the daemon logged.
fn calls(m: &TestMount) -> String {
    let log = m.log();
    let v: Vec<&str> = log.lines().filter(|l| l.contains("containerd")).collect();
    v.join("\n")
}

/// Devices (records) of containerd's in the pool.
fn layer_count(m: &TestMount) -> usize {
    containerd_rows(m).len()
}

#[test]
fn root_containerd_import_run_remove_and_kill9() {
    // Declared in this order so that they are dropped in reverse:
    // containerd (and its shims) first, then the thinfs daemon, then files.
    let dir = Scratch::new("ctd");
    let snap_sock = dir.path().join("snap.sock");
    let sock = snap_sock.to_string_lossy().into_owned();
    let mut m = TestMount::start_with("ctdfs", &["--containerd-socket", &sock]);
    let mode = std::fs::metadata(&snap_sock).expect("snapshotter socket");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    assert_eq!(mode.uid(), 0);
    let tar = build_image(dir.path());
    let ctd = Containerd::start(&dir.path().join("containerd"), &snap_sock);
    let plugins = ctd.ok(&["plugins", "ls"]);
    assert!(
        plugins.lines().any(|l| l.contains("snapshotter") && l.contains("thinfs") && l.contains("ok")),
        "{plugins}"
    );
    let used_before = pool_used(&m);

    // Import: two layers, each Prepare + apply + Commit, into thinfs.
    let t = Instant::now();
    ctd.ok(&["images", "import", "--snapshotter", "thinfs", &tar.to_string_lossy()]);
    let import_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("import of 2 layers: {import_ms:.0} ms");
    let layers = containerd_rows(&m);
    assert_eq!(
        layers.len(),
        2,
        "two committed layers: {:?}\n{}",
        list_all(&m),
        calls(&m)
    );
    // containerd's snapshots are not users' images: not in the mount's root.
    let root: Vec<String> = std::fs::read_dir(&m.mnt)
        .expect("read mount root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(root, [".thinfs"], "mount root shows only .thinfs");
    // Both layers are committed and detached: no loop device is used.
    assert_eq!(pool_loops(&m), 0, "committed layers stay detached");
    let keys = ctd.ok(&["snapshots", "--snapshotter", "thinfs", "ls"]);
    assert_eq!(
        keys.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{keys}"
    );

    // Run: the second layer's file is there, the whited-out one is not,
    // and the rootfs is writable.
    let o = ctd.run(
        "c1",
        "cat /etc/added; cat /etc/keep; test ! -e /etc/gone && echo nogone; echo written > /tmp/w && cat /tmp/w",
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "ctr run failed: {out}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        m.log()
    );
    assert_eq!(
        out.lines().map(str::trim).collect::<Vec<_>>(),
        ["from layer two", "keep", "nogone", "written"],
        "{out}"
    );
    // The container's snapshot went with it (--rm): its device is freed.
    wait_until("the container's snapshot is removed", || layer_count(&m) == 2);
    assert_eq!(pool_loops(&m), 0, "the container's device is detached");

    // kill -9 of thinfs while containerd runs; restart; run again.
    m.kill9();
    m.spawn();
    // containerd redials the proxy with a backoff (about 2 s here): until
    // then its calls fail with "unavailable", nothing else may.
    let t = Instant::now();
    let mut n = 0;
    let o = loop {
        n += 1;
        let o = ctd.run(&format!("c2-{n}"), "cat /etc/added");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if o.status.success() || !err.contains("unavailable") || t.elapsed() > Duration::from_secs(20) {
            break o;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "ctr run works again {:.1} s after the restart ({n} tries)",
        t.elapsed().as_secs_f64()
    );
    assert!(
        o.status.success(),
        "ctr run after restart failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "from layer two");
    wait_until("the second container's snapshot is removed", || {
        layer_count(&m) == 2
    });

    // Removing the image lets containerd's GC remove the layers: the pool
    // gives the space back and no device is left.
    ctd.ok(&["images", "rm", "--sync", IMAGE]);
    wait_until("containerd removed the layers", || layer_count(&m) == 0);
    assert_eq!(pool_loops(&m), 0);
    let used_after = pool_used(&m);
    assert!(
        used_after <= used_before + (1 << 20),
        "pool used {used_before} before, {used_after} after"
    );
    drop(ctd);
    let log = m.log();
    let timings: Vec<&str> = log.lines().filter(|l| l.contains("containerd: ")).collect();
    eprintln!("{}", timings.join("\n"));
}
