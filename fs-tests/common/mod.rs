//! Helpers for root tests: a scratch state directory with a marker suffix,
//! a pool opened on it, and cleanup that runs even when the test panics.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use thinfs::engine::{Engine, PoolOptions};
use thinfs::sys::file;
use thinfs::types::Bytes;

/// Marker in the name of every test object, so a pre-clean can find them.
pub const MARKER: &str = "thinfs-test";

/// Root for scratch directories (on the host filesystem).
pub fn scratch_root() -> PathBuf {
    PathBuf::from(std::env::var("THINFS_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
}

/// Remove leftovers of a crashed earlier run: scratch directories whose
/// owning process is gone. Loop devices and inner mounts need no sweep:
/// they are autoclear/detached and died with their process.
pub fn preclean() {
    let Ok(rd) = std::fs::read_dir(scratch_root()) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&format!("{MARKER}-")) else {
            continue;
        };
        let pid: u32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        preclean();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = scratch_root().join(format!("{MARKER}-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pool options for tests: a small pool.
pub fn opts(state: &Path) -> PoolOptions {
    let mut o = PoolOptions::new(state.join("state"));
    o.pool_size = Bytes(8 << 30);
    o.reserve = Some(Bytes(128 << 20));
    o.default_image_size = Bytes(1 << 30);
    o
}

pub fn open(state: &Path) -> Engine {
    Engine::open_pool(&opts(state)).expect("open pool")
}

/// Write `data` to `name` under a directory fd, fsync it.
pub fn write_file(dir: BorrowedFd<'_>, name: &str, data: &[u8]) {
    let fd = file::openat(
        dir,
        name.as_ref(),
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        0o644,
    )
    .expect("create file");
    let mut f = File::from(fd);
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

/// Read `name` under a directory fd.
pub fn read_file(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<Vec<u8>> {
    let fd = file::openat(dir, name.as_ref(), libc::O_RDONLY, 0)?;
    let mut v = Vec::new();
    File::from(fd).read_to_end(&mut v)?;
    Ok(v)
}

/// Pseudo-random bytes (xorshift), reproducible from `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Loop devices whose backing file lies under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    thinfs::sys::loopdev::backing_files()
        .into_iter()
        .filter(|(_, b)| b.starts_with(&d))
        .map(|(l, b)| format!("{} -> {b}", l.display()))
        .collect()
}

/// Wait (up to 10 s) until no loop device is backed by files under `dir`.
pub fn wait_no_loops(dir: &Path) -> Vec<String> {
    for _ in 0..200 {
        let l = loops_under(dir);
        if l.is_empty() {
            return l;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    loops_under(dir)
}
