//! The daemon's sockets have their final mode from the moment they appear
//! at their paths, even with the daemon's umask at 000: the containerd
//! socket 0600 (connecting is the right to change containerd's
//! snapshots), the control socket 0666. Neither is ever created in place
//! (where it would exist for a moment with the umask's mode): each comes
//! by a rename from a private directory, which inotify shows. Missing
//! directories above them are made 0755, not 0777.

mod common;

use common::*;
use std::ffi::CStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// An inotify descriptor watching directories for names created or moved in.
struct Watch(i32);

impl Watch {
    fn new() -> Watch {
        // SAFETY: no pointers.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        Watch(fd)
    }

    fn add(&self, dir: &Path) {
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        let w = unsafe {
            libc::inotify_add_watch(self.0, c.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO)
        };
        assert!(
            w >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Every (mask, name) queued so far.
    fn events(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut buf = vec![0u64; 8192];
        loop {
            // SAFETY: buf is a valid writable buffer of the size given.
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len() * 8) };
            if n <= 0 {
                return out;
            }
            let bytes = buf.as_ptr().cast::<u8>();
            let mut off = 0usize;
            while off < n as usize {
                // SAFETY: the kernel wrote whole events up to n bytes; each
                // starts with an inotify_event followed by `len` name bytes.
                let (mask, name, len) = unsafe {
                    let ev = bytes
                        .add(off)
                        .cast::<libc::inotify_event>()
                        .read_unaligned();
                    let name = if ev.len > 0 {
                        let p = bytes.add(off + std::mem::size_of::<libc::inotify_event>());
                        CStr::from_ptr(p.cast()).to_string_lossy().into_owned()
                    } else {
                        String::new()
                    };
                    (ev.mask, name, ev.len as usize)
                };
                out.push((mask, name));
                off += std::mem::size_of::<libc::inotify_event>() + len;
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn root_socket_mode_final_from_the_start_with_umask_000() {
    let s = Scratch::new("sockmode-cd");
    let cd_dir = s.path().join("run/thinfs");
    let cd_sock = cd_dir.join("containerd.sock");
    let cd_arg = format!("--containerd-socket={}", cd_sock.display());
    // The wrapper execs the daemon (same pid) with umask 000.
    let wrapper = ["sh", "-c", "umask 000; exec \"$@\"", "sh"];
    let mut m = TestMount::start_wrapped("sockmode", &wrapper, &[&cd_arg]);
    // Directories the daemon made: 0755 whatever the umask.
    assert_eq!(mode(&s.path().join("run")), 0o755);
    assert_eq!(mode(&cd_dir), 0o755);
    assert_eq!(mode(&cd_sock), 0o600);
    assert_eq!(mode(&m.socket()), 0o666);
    assert_eq!(mode(&m.state), 0o700, "state directory");
    // Again with both directories watched: a restart binds both sockets
    // anew over the stale ones.
    m.stop();
    let w = Watch::new();
    w.add(&cd_dir);
    w.add(m.scratch.path());
    m.spawn();
    let events = w.events();
    let names = ["containerd.sock", "ctl.sock"];
    for n in names {
        assert!(
            !events
                .iter()
                .any(|(mask, name)| name == n && mask & libc::IN_CREATE != 0),
            "{n} was created in place (with the umask's mode for a moment): {events:?}"
        );
        assert!(
            events
                .iter()
                .any(|(mask, name)| name == n && mask & libc::IN_MOVED_TO != 0),
            "{n} was not renamed into place: {events:?}"
        );
    }
    // Only private directories were made beside them, and none is left.
    for (mask, name) in &events {
        if mask & libc::IN_CREATE != 0 {
            assert!(mask & libc::IN_ISDIR != 0, "{name} created: {events:?}");
        }
    }
    for dir in [cd_dir.as_path(), m.scratch.path()] {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".thinfs-bind"))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
    }
    assert_eq!(mode(&cd_sock), 0o600);
    assert_eq!(mode(&m.socket()), 0o666);
    // Both answer.
    let o = m.cli(&["list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::os::unix::net::UnixStream::connect(&cd_sock).expect("containerd socket answers");
}
