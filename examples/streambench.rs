//! send | receive benchmark used by `scripts/bench`: two pools (two
//! engines, as two daemons would have), an image of SIZE MiB filled to
//! about 90 % with incompressible data, then, in the same run:
//! - `dd` (1 MiB direct I/O) from the snapshot's block device to a device
//!   of the same size in the receiving pool: the baseline;
//! - a full `send | receive` through a pipe, uncompressed;
//! - the same with `--compress` (the data does not compress: its cost);
//! - 1 % of the image rewritten at scattered places, snapshot, an
//!   incremental `send | receive`: stream size and time.
//!
//! Prints one JSON object. Usage: streambench DIR SIZE_MIB

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;
use thinfs::engine::{Engine, PoolOptions, Progress, Target};
use thinfs::error::Result;
use thinfs::types::{Bytes, Name};

struct Quiet;
impl Progress for Quiet {
    fn total(&self, _n: u64) {}
    fn advance(&self, _n: u64) -> Result<()> {
        Ok(())
    }
}

fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

fn pool(dir: &std::path::Path, size: u64) -> Engine {
    let mut o = PoolOptions::new(dir.join("state"));
    o.pool_size = Bytes(size * 4 + (4 << 30));
    o.reserve = Some(Bytes(256 << 20));
    Engine::open_pool(&o).expect("open pool")
}

fn drop_caches() {
    let _ = std::process::Command::new("sh")
        .args(["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        .status();
}

/// Fill `f` with `len` bytes of xorshift data from `seed`, 1 MiB at a time.
fn fill(f: &std::fs::File, at: u64, len: u64, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = ((len - off) as usize).min(buf.len());
        f.write_all_at(&buf[..n], at + off).expect("write");
        off += n as u64;
    }
}

/// `send SNAP [-i BASE] | receive INTO`, both ends timed together.
/// Returns (seconds, stream bytes).
fn send_receive(
    a: &Engine,
    b: &Engine,
    snap: &str,
    base: Option<&str>,
    into: &str,
    compress: bool,
) -> (f64, u64) {
    let s = a.resolve(&Target::parse(snap).unwrap()).expect("snapshot");
    let bs = base.map(|t| a.resolve(&Target::parse(t).unwrap()).expect("base"));
    drop_caches();
    let (mut r, mut w) = std::io::pipe().expect("pipe");
    let t = Instant::now();
    let got = std::thread::scope(|sc| {
        let sender = sc.spawn(move || {
            let st = a
                .send_stream(&s, bs.as_ref(), compress, &mut w, &Quiet)
                .expect("send");
            w.flush().expect("flush");
            drop(w);
            st
        });
        let got = b
            .receive_stream(&name(into), false, &mut r, &Quiet)
            .expect("receive");
        sender.join().expect("sender");
        got
    });
    (t.elapsed().as_secs_f64(), got.bytes)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 3 {
        eprintln!("usage: streambench DIR SIZE_MIB");
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&a[1]);
    let size: u64 = a[2].parse::<u64>().expect("SIZE_MIB") << 20;
    let (pa, pb) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&pa).expect("mkdir");
    std::fs::create_dir_all(&pb).expect("mkdir");
    let src = pool(&pa, size);
    let dst = pool(&pb, size);

    // The source: one big file of incompressible data, ~90 % of the image.
    let img = src
        .create_image(&name("src"), Some(Bytes(size)))
        .expect("image");
    // At most 95 % of what its ext4 has free (small images).
    let mut file_len = size / 10 * 9;
    {
        let m = src.mount(img.id).expect("mount");
        let st = thinfs::sys::fsio::statvfs(m.root()).expect("statvfs");
        let free = st.f_bavail * st.f_frsize;
        file_len = file_len.min(free / 20 * 19) & !((1 << 20) - 1);
        let p = format!("/proc/self/fd/{}/data", {
            use std::os::fd::AsRawFd;
            m.root().as_raw_fd()
        });
        let f = std::fs::File::create(&p).expect("create");
        fill(&f, 0, file_len, 1);
        f.sync_all().expect("fsync");
    }
    src.unmount(img.id);
    src.snapshot(img.id, &name("s1")).expect("snapshot");

    // Baseline: dd between the same two devices.
    let s1 = src.resolve(&Target::parse("src@s1").unwrap()).unwrap();
    let ddt = dst
        .create_image(&name("ddtarget"), Some(Bytes(size)))
        .unwrap();
    let dd_s = {
        let from = src.backend().activate(s1.dev, s1.size, true).unwrap();
        let to = dst.backend().activate(ddt.dev, ddt.size, false).unwrap();
        drop_caches();
        let t = Instant::now();
        let st = std::process::Command::new("dd")
            .arg(format!("if={}", from.path().display()))
            .arg(format!("of={}", to.path().display()))
            .args(["bs=1M", "iflag=direct", "oflag=direct", "conv=fsync"])
            .arg(format!("count={}", size >> 20))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("dd");
        assert!(st.success(), "dd failed");
        t.elapsed().as_secs_f64()
    };

    let (full_s, full_bytes) = send_receive(&src, &dst, "src@s1", None, "copy", false);
    let (lz_s, lz_bytes) = send_receive(&src, &dst, "src@s1", None, "copylz", true);

    // 1 % of the image rewritten, in 256 KiB pieces spread over the file.
    let change = size / 100;
    let piece = 256u64 << 10;
    let pieces = change.div_ceil(piece);
    {
        let m = src.mount(img.id).expect("mount");
        let p = format!("/proc/self/fd/{}/data", {
            use std::os::fd::AsRawFd;
            m.root().as_raw_fd()
        });
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let stride = (file_len / pieces) / piece * piece;
        for i in 0..pieces {
            fill(&f, i * stride, piece, 100 + i);
        }
        f.sync_all().expect("fsync");
    }
    src.unmount(img.id);
    src.snapshot(img.id, &name("s2")).expect("snapshot");
    let (inc_s, inc_bytes) = send_receive(&src, &dst, "src@s2", Some("src@s1"), "copy", false);

    let mib = |b: u64, s: f64| b as f64 / (1 << 20) as f64 / s;
    println!(
        "{{\"size_mib\":{},\"data_mib\":{},\"dd_s\":{dd_s:.3},\"dd_mib_s\":{:.1},\
\"full_s\":{full_s:.3},\"full_mib_s\":{:.1},\"full_stream_bytes\":{full_bytes},\
\"full_vs_dd\":{:.3},\"compressed_s\":{lz_s:.3},\"compressed_stream_bytes\":{lz_bytes},\
\"compressed_vs_dd\":{:.3},\"changed_bytes\":{},\"incremental_s\":{inc_s:.3},\
\"incremental_stream_bytes\":{inc_bytes},\"incremental_stream_of_image\":{:.4},\
\"incremental_time_of_full\":{:.4}}}",
        size >> 20,
        file_len >> 20,
        mib(size, dd_s),
        mib(size, full_s),
        dd_s / full_s,
        dd_s / lz_s,
        pieces * piece,
        inc_bytes as f64 / size as f64,
        inc_s / full_s,
    );
    drop(src);
    drop(dst);
}
