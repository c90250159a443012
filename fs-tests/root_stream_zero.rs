//! Root tests of zero detection in send (reflink pools, real loop devices
//! and ext4): blocks that are allocated but hold only zeros go as zero
//! records (incremental) or not at all (full), never as data, and the
//! received snapshots are the same bytes as the sent ones.

mod common;

use common::stream::*;
use common::*;
use std::path::Path;
use thinfs::engine::Engine;
use thinfs::types::Bytes;

/// blake3 of a device's whole contents, read through its block device.
fn device_digest(e: &Engine, t: &str) -> String {
    let r = snap(e, t);
    let active = e.backend().activate(r.dev, r.size, true).unwrap();
    let mut f = std::fs::File::open(active.path()).unwrap();
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).unwrap();
    h.finalize().to_string()
}

/// Write `mib` MiB of zeros into `file` at `seek_mib` with real direct
/// writes (allocated blocks, not holes), keeping the rest of the file.
fn dd_zeros(file: &Path, seek_mib: u64, mib: u64) {
    // dd is another process: /proc/self is not ours there.
    let file = match file.strip_prefix("/proc/self") {
        Ok(rest) => Path::new(&format!("/proc/{}", std::process::id())).join(rest),
        Err(_) => file.to_path_buf(),
    };
    let out = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", "oflag=direct", "conv=notrunc,fsync"])
        .arg(format!("seek={seek_mib}"))
        .arg(format!("count={mib}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes the file really has on disk.
fn allocated(file: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(file).unwrap().blocks() * 512
}

#[test]
fn root_stream_zero_blocks_of_a_full_stream_are_not_data() {
    let (sa, sb) = (Scratch::new("send"), Scratch::new("recv"));
    let (a, b) = (open(sa.path()), open(sb.path()));
    let img = a.create_image(&n("src"), Some(Bytes(256 << 20))).unwrap();
    let used_before = used(&a);
    {
        let m = a.mount(img.id).unwrap();
        let root = proc_path(m.root());
        populate(&root);
        dd_zeros(&root.join("zeros"), 0, 64);
        assert!(
            allocated(&root.join("zeros")) >= 64 << 20,
            "the zeros are allocated blocks, not holes"
        );
        thinfs::sys::fsio::syncfs(m.root()).unwrap();
    }
    a.snapshot(img.id, &n("s1")).unwrap();
    let alloc = used(&a) - used_before;
    assert!(alloc >= 64 << 20, "the pool holds the zeros: {alloc}");
    let full = send(&a, "src@s1", None);
    eprintln!(
        "full stream of 64 MiB of written zeros + 3 MiB of data: {} bytes ({} allocated)",
        full.len(),
        alloc
    );
    assert!(
        (full.len() as u64) < alloc / 4,
        "the full stream ({} bytes) must not carry the 64 MiB of zeros (allocated {alloc})",
        full.len()
    );
    let r = receive(&b, "copy", false, &full).unwrap();
    assert!(r.created_image);
    assert_same_tree(&a, "src@s1", &b, "copy@s1");
    assert_eq!(device_digest(&a, "src@s1"), device_digest(&b, "copy@s1"));
}

#[test]
fn root_stream_zeros_over_base_data_reach_the_incremental() {
    let (sa, sb) = (Scratch::new("send"), Scratch::new("recv"));
    let (a, b) = (open(sa.path()), open(sb.path()));
    let img = a.create_image(&n("src"), Some(Bytes(256 << 20))).unwrap();
    {
        let m = a.mount(img.id).unwrap();
        let root = proc_path(m.root());
        populate(&root);
        std::fs::write(root.join("big.bin"), pattern(32 << 20, 7)).unwrap();
        thinfs::sys::fsio::syncfs(m.root()).unwrap();
    }
    a.snapshot(img.id, &n("s1")).unwrap();
    let full = send(&a, "src@s1", None);
    receive(&b, "copy", false, &full).unwrap();
    {
        // Zeros written over 16 MiB of the base's data, in place.
        let m = a.mount(img.id).unwrap();
        let root = proc_path(m.root());
        dd_zeros(&root.join("big.bin"), 8, 16);
        thinfs::sys::fsio::syncfs(m.root()).unwrap();
    }
    a.snapshot(img.id, &n("s2")).unwrap();
    let inc = send(&a, "src@s2", Some("src@s1"));
    eprintln!(
        "incremental of 16 MiB of zeros over data: {} bytes",
        inc.len()
    );
    assert!(
        inc.len() < 4 << 20,
        "the incremental ({} bytes) must carry the 16 MiB of zeros as zero records",
        inc.len()
    );
    receive(&b, "copy", false, &inc).unwrap();
    {
        let s = snap(&b, "copy@s2");
        let m = b.mount(s.id).unwrap();
        let got = std::fs::read(proc_path(m.root()).join("big.bin")).unwrap();
        let mut want = pattern(32 << 20, 7);
        want[8 << 20..24 << 20].fill(0);
        assert!(
            got == want,
            "big.bin must read zeros over the overwritten range"
        );
    }
    assert_same_tree(&a, "src@s2", &b, "copy@s2");
    assert_same_tree(&a, "src@s1", &b, "copy@s1");
    assert_eq!(device_digest(&a, "src@s2"), device_digest(&b, "copy@s2"));
    assert_eq!(device_digest(&a, "src@s1"), device_digest(&b, "copy@s1"));
}
