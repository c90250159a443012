//! The FUSE mount's own flags: `nosuid,nodev` unless root mounts with
//! `--allow-suid-dev` (or `allow_suid_dev = true` in the config file).
//! A setuid-root program copied into an image runs without privilege by
//! default, and as root with the option.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;

/// The options of the mount at `mnt`, from /proc/mounts.
fn mount_opts(mnt: &std::path::Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(mnt.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} not in /proc/mounts", mnt.display()));
    line.split_whitespace()
        .nth(3)
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect()
}

/// Copy `id` into image `img` setuid root; the effective uid it prints
/// when nobody runs it.
fn setuid_id_as_nobody(m: &TestMount, img: &str) -> String {
    let o = m.cli(&["create", img]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prog = m.path(&format!("{img}/id"));
    std::fs::copy("/usr/bin/id", &prog).unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let (ok, out) = as_nobody(&format!("{} -u", prog.display()));
    assert!(ok, "{out}");
    out.trim().to_string()
}

#[test]
fn root_mount_flags_nosuid_nodev_by_default() {
    let m = TestMount::start("flags-default");
    let opts = mount_opts(&m.mnt);
    assert!(opts.iter().any(|o| o == "nosuid"), "{opts:?}");
    assert!(opts.iter().any(|o| o == "nodev"), "{opts:?}");
    assert_eq!(setuid_id_as_nobody(&m, "img"), "65534");
}

#[test]
fn root_mount_flags_allow_suid_dev_by_flag_and_config() {
    let m = TestMount::start_with("flags-allow", &["--allow-suid-dev"]);
    let opts = mount_opts(&m.mnt);
    assert!(!opts.iter().any(|o| o == "nosuid"), "{opts:?}");
    assert!(!opts.iter().any(|o| o == "nodev"), "{opts:?}");
    assert_eq!(setuid_id_as_nobody(&m, "img"), "0");
    drop(m);
    // The same from the config file.
    let s = Scratch::new("flags-config");
    let cfg = s.path().join("config.toml");
    std::fs::write(&cfg, "allow_suid_dev = true\n").unwrap();
    let m = TestMount::start_with("flags-config", &["--config", cfg.to_str().unwrap()]);
    let opts = mount_opts(&m.mnt);
    assert!(!opts.iter().any(|o| o == "nosuid"), "{opts:?}");
}
