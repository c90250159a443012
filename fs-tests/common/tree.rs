//! Helpers of the root tests that compare file trees entry by entry
//! (export, import, restore): commands that must succeed, and every
//! entry's type, owner, mode, times, content, links and xattrs.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn sh(cmd: &str) {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Every extended attribute of `p` (not following a symlink).
pub fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if std::fs::symlink_metadata(p)
        .unwrap()
        .file_type()
        .is_symlink()
    {
        return out;
    }
    let fd = thinfs::sys::file::open_path(
        std::fs::File::open(p.parent().unwrap()).unwrap().as_fd(),
        p.file_name().unwrap(),
    )
    .unwrap();
    let len = thinfs::sys::file::listxattr(fd.as_fd(), 0).unwrap().len();
    if len == 0 {
        return out;
    }
    let list = thinfs::sys::file::listxattr(fd.as_fd(), len).unwrap();
    for n in list.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::new(std::str::from_utf8(n).unwrap());
        let l = thinfs::sys::file::getxattr(fd.as_fd(), name, 0)
            .unwrap()
            .len();
        let v = thinfs::sys::file::getxattr(fd.as_fd(), name, l.max(1)).unwrap();
        out.insert(name.to_string_lossy().into_owned(), v);
    }
    out
}

/// Relative paths of every entry under `root` (not following symlinks),
/// `lost+found` at the top left out.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    fn go(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            if rel.as_os_str().is_empty() && n == "lost+found" {
                continue;
            }
            let r = rel.join(&n);
            out.push(r.clone());
            if std::fs::symlink_metadata(root.join(&r)).unwrap().is_dir() {
                go(root, &r, out);
            }
        }
    }
    let mut out = Vec::new();
    go(root, Path::new(""), &mut out);
    out
}

/// Compare two trees entry by entry: type, owner, mode, mtime, content,
/// link targets, device numbers, hard link identity, xattrs.
pub fn compare_trees(want: &Path, got: &Path) {
    let w = walk(want);
    let g = walk(got);
    assert_eq!(w, g, "entries differ");
    let mut links_w: HashMap<u64, PathBuf> = HashMap::new();
    let mut links_g: HashMap<u64, PathBuf> = HashMap::new();
    for rel in &w {
        let (a, b) = (want.join(rel), got.join(rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&a).unwrap(),
            std::fs::symlink_metadata(&b).unwrap(),
        );
        let r = rel.display();
        assert_eq!(
            ma.mode(),
            mb.mode(),
            "{r}: mode {:o} vs {:o}",
            ma.mode(),
            mb.mode()
        );
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{r}: owner");
        if !ma.file_type().is_symlink() {
            assert_eq!(
                (ma.mtime(), ma.mtime_nsec()),
                (mb.mtime(), mb.mtime_nsec()),
                "{r}: mtime"
            );
        }
        let ft = ma.file_type();
        if ft.is_file() {
            assert_eq!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&b).unwrap(),
                "{r}: content"
            );
            assert_eq!(ma.nlink(), mb.nlink(), "{r}: link count");
            // Hard links: names of one inode on one side are names of one
            // inode on the other.
            let fa = links_w
                .entry(ma.ino())
                .or_insert_with(|| rel.clone())
                .clone();
            let fb = links_g
                .entry(mb.ino())
                .or_insert_with(|| rel.clone())
                .clone();
            assert_eq!(fa, fb, "{r}: hard link identity");
        }
        if ft.is_symlink() {
            assert_eq!(
                std::fs::read_link(&a).unwrap(),
                std::fs::read_link(&b).unwrap(),
                "{r}"
            );
        }
        if ft.is_char_device() || ft.is_block_device() {
            assert_eq!(ma.rdev(), mb.rdev(), "{r}: device numbers");
        }
        assert_eq!(xattrs(&a), xattrs(&b), "{r}: xattrs");
    }
}
