//! The space guard while containerd's devices are mounted and unmounted
//! in a loop (issue 22, item 7: a dm guest locked up with the guard's
//! thread on a CPU while containerd mounted and unmounted its views).
//! Drives the engine and its containerd snapshots directly, with the guard
//! thread the daemon would start; the mounts are made as containerd makes
//! them, by someone else, in this mount namespace and in another one.
//! Runs on the host (reflink) and in `scripts/dm-test`'s guest (dm-thin).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use thinfs::engine::Engine;
use thinfs::engine::containerd::Layers;
use thinfs::engine::space::SpaceGuard;

/// How long the mounts churn: 12 s, or THINFS_CHURN_SECS (a longer run
/// to look for a lockup).
fn churn_time() -> Duration {
    Duration::from_secs(
        std::env::var("THINFS_CHURN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12),
    )
}
/// The longest the guard may go without a tick (it ticks every 25 ms).
const STALL: Duration = Duration::from_secs(5);

fn mount(src: &Path, dir: &Path) -> bool {
    Command::new("mount")
        .args(["-t", "ext4"])
        .arg(src)
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn umount(dir: &Path) {
    let _ = Command::new("umount")
        .arg(dir)
        .stderr(Stdio::null())
        .status();
}

/// Mounts of this test, undone on drop (a panic included): the loops in
/// other mount namespaces are killed (their mounts die with them), ours
/// are unmounted.
struct Cleanup {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.dirs {
            while std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .any(|l| l.split(' ').nth(4) == d.to_str())
            {
                let _ = Command::new("umount").arg("-l").arg(d).status();
            }
        }
    }
}

/// A shell loop in its own mount namespace that mounts `src` at `dir`,
/// writes, unmounts, until `stop` exists.
fn churn_elsewhere(src: &Path, dir: &Path, stop: &Path) -> Child {
    let script = format!(
        "while [ ! -e '{stop}' ]; do mount -t ext4 '{src}' '{dir}' 2>/dev/null && \
         {{ echo x > '{dir}/f'; umount '{dir}'; }}; done",
        stop = stop.display(),
        src = src.display(),
        dir = dir.display()
    );
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .spawn()
        .unwrap()
}

#[test]
fn root_space_guard_keeps_sampling_while_layers_mount_and_unmount() {
    let s = Scratch::new("guardchurn");
    let e = Arc::new(Engine::open_pool(&opts(s.path())).unwrap());
    let layers = Layers::new(e.clone());
    let guard = SpaceGuard::start(e.clone()).unwrap();
    let a = layers
        .prepare("churn-a", "", BTreeMap::new(), false)
        .unwrap()
        .source;
    let b = layers
        .prepare("churn-b", "", BTreeMap::new(), false)
        .unwrap()
        .source;
    let dir = |n: &str| {
        let d = s.path().join(n);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let (d1, d2, d3, d4) = (dir("a1"), dir("a2"), dir("b1"), dir("b2"));
    let stop_file = s.path().join("stop");
    let mut clean = Cleanup {
        dirs: vec![d1.clone(), d2.clone()],
        children: vec![],
    };
    // Elsewhere: a in one more place (the same superblock), b alone.
    clean.children.push(churn_elsewhere(&a, &d3, &stop_file));
    clean.children.push(churn_elsewhere(&b, &d4, &stop_file));
    let stop = AtomicBool::new(false);
    let cycles = std::thread::scope(|sc| {
        // Here: a at two places, mounted and unmounted as fast as mount(8)
        // goes, with a write in between.
        let here = sc.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if mount(&a, &d1) {
                    let second = mount(&a, &d2);
                    let _ = std::fs::write(d1.join("f"), b"x");
                    if second {
                        umount(&d2);
                    }
                    umount(&d1);
                    n += 1;
                }
            }
            n
        });
        // The guard ticks throughout.
        let t0 = Instant::now();
        let mut last = (guard.ticks(), Instant::now());
        while t0.elapsed() < churn_time() {
            std::thread::sleep(Duration::from_millis(100));
            let t = guard.ticks();
            if t != last.0 {
                last = (t, Instant::now());
            }
            if last.1.elapsed() > STALL {
                stop.store(true, Ordering::Relaxed);
                panic!(
                    "the space guard made no tick for {:?} while containerd's devices were mounted and unmounted",
                    last.1.elapsed()
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        here.join().unwrap()
    });
    std::fs::write(&stop_file, b"").unwrap();
    for c in &mut clean.children {
        assert!(c.wait().unwrap().success());
    }
    clean.children.clear();
    println!(
        "guard churn: {cycles} mount cycles here, {} guard ticks, {} with containerd devices",
        guard.ticks(),
        guard.layer_ticks()
    );
    assert!(cycles > 0);
    // A device mounted only in another mount namespace is found and
    // sampled (as containerd's and runc's mounts are).
    let held = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t ext4 '{}' '{}' && exec sleep 600",
            b.display(),
            d4.display()
        ))
        .spawn()
        .unwrap();
    clean.children.push(held);
    let deadline = Instant::now() + HANG;
    let seen = guard.layer_ticks();
    while guard.layer_ticks() < seen + 3 {
        assert!(
            Instant::now() < deadline,
            "the guard does not sample a device mounted in another namespace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(clean);
    // A mount namespace's mounts go away after its last process: wait for
    // the superblocks to be gone before the devices are removed.
    for dev in [&a, &b] {
        let name = std::fs::canonicalize(dev).unwrap();
        let sysfs = Path::new("/sys/fs/ext4").join(name.file_name().unwrap());
        let deadline = Instant::now() + HANG;
        while sysfs.exists() {
            assert!(Instant::now() < deadline, "{} still mounted", dev.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(guard);
    layers.remove("churn-a").unwrap();
    layers.remove("churn-b").unwrap();
}
