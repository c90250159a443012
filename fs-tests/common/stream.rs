//! Helpers of the send/receive root tests: streams made and received
//! through the engine, and trees compared file by file.

use super::pattern;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use thinfs::engine::{Engine, Progress, Target};
use thinfs::error::Result;
use thinfs::meta::DeviceRecord;
use thinfs::types::Name;

pub fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub struct Quiet;
impl Progress for Quiet {
    fn total(&self, _n: u64) {}
    fn advance(&self, _n: u64) -> Result<()> {
        Ok(())
    }
}

pub fn proc_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

pub fn snap(e: &Engine, t: &str) -> DeviceRecord {
    e.resolve(&Target::parse(t).unwrap()).unwrap()
}

pub fn send(e: &Engine, t: &str, base: Option<&str>) -> Vec<u8> {
    let s = snap(e, t);
    let b = base.map(|b| snap(e, b));
    let mut out = Vec::new();
    e.send_stream(&s, b.as_ref(), false, &mut out, &Quiet)
        .unwrap();
    out
}

pub fn receive(
    e: &Engine,
    name: &str,
    force: bool,
    stream: &[u8],
) -> Result<thinfs::engine::Received> {
    let mut r: &[u8] = stream;
    e.receive_stream(&n(name), force, &mut r, &Quiet)
}

/// Everything a user sees of a tree: type, mode, owner, size, content
/// digest or link target, xattrs, and hard links (by first path).
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for ent in std::fs::read_dir(root.join(&rel)).unwrap() {
            let ent = ent.unwrap();
            let r = rel.join(ent.file_name());
            let key = r.to_string_lossy().into_owned();
            if key == "lost+found" {
                continue;
            }
            let p = root.join(&r);
            let md = std::fs::symlink_metadata(&p).unwrap();
            let mut d = format!("mode {:o} uid {} gid {}", md.mode(), md.uid(), md.gid());
            if md.file_type().is_symlink() {
                d += &format!(" -> {:?}", std::fs::read_link(&p).unwrap());
            } else {
                let f = std::fs::File::open(&p).unwrap();
                let list = thinfs::sys::file::listxattr(f.as_fd(), 4096).unwrap();
                for name in list.split(|&b| b == 0).filter(|x| !x.is_empty()) {
                    let name = std::ffi::OsStr::new(std::str::from_utf8(name).unwrap());
                    let v = thinfs::sys::file::getxattr(f.as_fd(), name, 4096).unwrap();
                    d += &format!(" xattr {name:?}={v:?}");
                }
                if md.is_dir() {
                    stack.push(r.clone());
                } else {
                    if md.nlink() > 1 {
                        if let Some(first) = inodes.get(&md.ino()) {
                            d += &format!(" hardlink of {first}");
                        } else {
                            inodes.insert(md.ino(), key.clone());
                        }
                    }
                    let data = std::fs::read(&p).unwrap();
                    d += &format!(" size {} blake3 {}", data.len(), blake3::hash(&data));
                }
            }
            out.insert(key, d);
        }
    }
    out
}

pub fn populate(root: &Path) {
    std::fs::create_dir(root.join("dir")).unwrap();
    std::fs::write(root.join("dir/a.bin"), pattern(3 << 20, 1)).unwrap();
    std::fs::write(root.join("small.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink("dir/a.bin", root.join("link")).unwrap();
    std::fs::hard_link(root.join("small.txt"), root.join("dir/hard")).unwrap();
    std::os::unix::fs::chown(root.join("small.txt"), Some(1234), Some(4321)).unwrap();
    std::fs::set_permissions(
        root.join("dir"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    let f = std::fs::File::open(root.join("dir/a.bin")).unwrap();
    thinfs::sys::file::setxattr(f.as_fd(), "user.color".as_ref(), b"blue", 0).unwrap();
}

/// What a refusal must leave exactly as it was in the receiving pool.
pub fn pool_state(e: &Engine) -> (Vec<String>, Vec<u32>) {
    let recs = e
        .records()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {:?} {:?}",
                r.id, r.dev, r.name, r.state, r.identity
            )
        })
        .collect();
    let devs = e
        .backend()
        .list()
        .unwrap()
        .iter()
        .map(|d| d.get())
        .collect();
    (recs, devs)
}

pub fn used(e: &Engine) -> u64 {
    e.backend().status().unwrap().used
}

pub fn assert_same_tree(a: &Engine, at: &str, b: &Engine, bt: &str) {
    let ra = snap(a, at);
    let rb = snap(b, bt);
    let ma = a.mount(ra.id).unwrap();
    let mb = b.mount(rb.id).unwrap();
    let ta = tree(&proc_path(ma.root()));
    let tb = tree(&proc_path(mb.root()));
    assert!(!ta.is_empty(), "source tree is empty");
    assert_eq!(ta, tb, "{at} and {bt} must hold the same files");
}
