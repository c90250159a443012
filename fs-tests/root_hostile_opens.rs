//! Root tests of what users' open files cost the daemon, and what they see
//! of setuid/setgid bits: open files and directories of a hostile user
//! cannot take the daemon's descriptors from root and other users; opens
//! of `.thinfs` files share one rendered copy; the kernel never shows
//! setuid/setgid bits that a write, truncate or chown has cleared.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

/// A child process killed (by its own pid) and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    /// Start `script` with `args` as uid/gid `id` (no groups); its stdin
    /// is a pipe that keeps it alive.
    fn python_as(id: u32, script: &std::path::Path, args: &[String]) -> Reaped {
        Reaped(
            Command::new("setpriv")
                .arg(format!("--reuid={id}"))
                .arg(format!("--regid={id}"))
                .args(["--clear-groups", "/usr/bin/python3"])
                .arg(script)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start python"),
        )
    }

    /// The next line the child prints.
    fn line(&mut self) -> String {
        let mut line = String::new();
        let out = self.0.stdout.as_mut().expect("stdout");
        BufReader::new(out).read_line(&mut line).expect("read");
        line
    }

    /// Tell the child to go on (one line on its stdin).
    fn go(&mut self) {
        let i = self.0.stdin.as_mut().expect("stdin");
        i.write_all(b"go\n").expect("write");
        i.flush().expect("flush");
    }
}

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The mode as `stat -c %a` shows it: coreutils asks statx for the mode
/// alone, which the kernel answers from its cache while the mode is valid
/// there (a full `stat` would refetch after a write, which marks size and
/// times stale).
fn mode_of(p: &std::path::Path) -> u32 {
    let o = Command::new("stat")
        .arg("-c")
        .arg("%a")
        .arg(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "stat {}", p.display());
    u32::from_str_radix(String::from_utf8_lossy(&o.stdout).trim(), 8).unwrap()
}

fn chmod(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// setuid/setgid cleared on disk by another user's write, truncate or by
/// root's chown are gone from `stat` through the mount at once, as on
/// ext4, whatever the kernel cached before.
#[test]
fn suid_bits_cleared_by_writes_are_not_shown_stale() {
    let m = TestMount::start("suidstat");
    std::fs::create_dir(m.path("base")).unwrap();
    chmod(&m.path("base"), 0o1777);
    let rounds = 5;
    let mut stale = Vec::new();
    for r in 0..rounds {
        for (i, mode) in [0o4777u32, 0o2777, 0o6777].into_iter().enumerate() {
            // One file per way of clearing the bits.
            let p = |what: &str| m.path(&format!("base/{what}-{r}-{i}"));
            let ways = ["write", "append", "trunc", "otrunc", "rootopen", "chown"];
            for w in ways {
                std::fs::write(p(w), b"abc").unwrap();
                chmod(&p(w), mode);
                // The kernel caches the attributes with the bits.
                assert_eq!(mode_of(&p(w)), mode, "{w}");
            }
            // Root holds one open (read-only) while nobody writes: the
            // backing file is root's.
            let held = std::fs::File::open(p("rootopen")).unwrap();
            let s = |w: &str| p(w).display().to_string();
            let (good, out) = as_nobody(&format!(
                "printf x | dd of={} bs=1 seek=1 conv=notrunc status=none && \
                 printf x >> {} && truncate -s 1 {} && : > {} && \
                 printf x | dd of={} bs=1 conv=notrunc status=none",
                s("write"),
                s("append"),
                s("trunc"),
                s("otrunc"),
                s("rootopen"),
            ));
            assert!(good, "nobody's writes: {out}");
            drop(held);
            std::os::unix::fs::chown(p("chown"), Some(1), Some(1)).unwrap();
            for w in ways {
                // On ext4 (and on disk here): suid always goes; sgid goes
                // with group exec (all of these modes have it).
                let want = mode & !0o6000;
                let got = mode_of(&p(w));
                if got != want {
                    stale.push(format!("{w} {mode:o}: stat shows {got:o}"));
                }
            }
        }
    }
    assert!(stale.is_empty(), "stale setuid/setgid bits: {stale:?}");
}
