//! Descriptors sent on the control socket (SCM_RIGHTS) do not pile up in
//! the daemon: unprivileged users send 1-byte chunks each carrying
//! descriptors, on many connections, while root creates images, writes and
//! reads files and lists; nothing of root's fails, and the daemon's open
//! descriptors stay bounded. The daemon runs with a low descriptor limit
//! (1024) so that a pile-up would show at once.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Python helper run as another user: for `secs` seconds, connect to the
/// control socket and send 1-byte chunks, the first with `first`
/// descriptors (copies of /dev/null), every later one with `rest`; when
/// the daemon closes the connection, connect again. Prints the counts.
const FLOOD: &str = r#"
import os, resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
path, first, rest, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
null = os.open("/dev/null", os.O_RDONLY)
end = time.time() + secs
conns = chunks = 0
while time.time() < end:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(1)
    try:
        s.connect(path)
    except Exception:
        time.sleep(0.01)
        continue
    conns += 1
    n = first
    try:
        while time.time() < end:
            socket.send_fds(s, [b"x"], [null] * n)
            chunks += 1
            n = rest
    except Exception:
        pass
    s.close()
print("connections", conns, "chunks", chunks, flush=True)
"#;

/// Descriptors of `pid` open on /dev/null, and sockets.
fn held(pid: u32) -> (usize, usize) {
    let (mut null, mut sock) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        match std::fs::read_link(e.path()) {
            Ok(l) if l == std::path::Path::new("/dev/null") => null += 1,
            Ok(l) if l.to_string_lossy().starts_with("socket:") => sock += 1,
            _ => {}
        }
    }
    (null, sock)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A child process killed (by its own pid) and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn root_scm_flood_descriptors_do_not_pile_up() {
    let m = TestMount::start_wrapped("scmflood", &["prlimit", "--nofile=1024:1024"], &[]);
    let pid = m.pid();
    let o = m.cli(&["create", "base"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = m.scratch.path().join("flood.py");
    std::fs::write(&script, FLOOD).unwrap();
    let fds0 = open_fds(pid);
    let secs = 6;
    // (uid, descriptors with the first chunk, with every later chunk)
    let senders: [(u32, u32, u32); 5] = [
        (65534, 4, 4),
        (65534, 4, 4),
        (65534, 1, 1),
        (12345, 200, 200),
        (12345, 0, 4),
    ];
    let mut floods: Vec<Reaped> = senders
        .iter()
        .map(|&(uid, first, rest)| {
            Reaped(
                Command::new("setpriv")
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args(["--clear-groups", "/usr/bin/python3"])
                    .arg(&script)
                    .arg(m.socket())
                    .arg(first.to_string())
                    .arg(rest.to_string())
                    .arg(secs.to_string())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start a flood"),
            )
        })
        .collect();
    // The daemon's descriptors of the kinds the floods could leave (the
    // copies of /dev/null they send, and sockets), sampled while they run.
    let (null0, sock0) = held(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let most_null = Arc::new(AtomicUsize::new(null0));
    let most_sock = Arc::new(AtomicUsize::new(sock0));
    let sampler = {
        let (stop, mn, ms) = (stop.clone(), most_null.clone(), most_sock.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (n, s) = held(pid);
                mn.fetch_max(n, Ordering::SeqCst);
                ms.fetch_max(s, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Root's work meanwhile.
    let t0 = Instant::now();
    let mut failures = Vec::new();
    let mut rounds = 0;
    while t0.elapsed() < Duration::from_secs(secs - 1) {
        if rounds < 3 {
            let name = format!("img{rounds}");
            let o = m.cli(&["create", &name]);
            if !o.status.success() {
                failures.push(format!(
                    "create {name}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
        let f = m.path(&format!("base/f{rounds}"));
        let data = format!("round {rounds}");
        match std::fs::write(&f, &data).and_then(|_| std::fs::read(&f)) {
            Ok(d) if d == data.as_bytes() => {}
            Ok(d) => failures.push(format!("{}: read back {d:?}", f.display())),
            Err(e) => failures.push(format!("{}: {e}", f.display())),
        }
        let o = m.cli(&["list"]);
        if !o.status.success() {
            failures.push(format!("list: {}", String::from_utf8_lossy(&o.stderr)));
        }
        rounds += 1;
    }
    let mut reports = Vec::new();
    for f in floods.iter_mut() {
        let _ = f.0.wait();
        let mut out = String::new();
        if let Some(mut so) = f.0.stdout.take() {
            use std::io::Read;
            let _ = so.read_to_string(&mut out);
        }
        reports.push(out.trim().to_string());
    }
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let (most_null, most_sock) = (
        most_null.load(Ordering::SeqCst),
        most_sock.load(Ordering::SeqCst),
    );
    println!(
        "root rounds {rounds}, failures {}; daemon descriptors {fds0} before, {} after; \
         /dev/null {null0} before, at most {most_null} during; sockets {sock0} before, \
         at most {most_sock} during; floods: {reports:?}",
        failures.len(),
        open_fds(pid)
    );
    assert!(
        reports.iter().all(|r| r.starts_with("connections")),
        "{reports:?}"
    );
    let chunks: u64 = reports
        .iter()
        .filter_map(|r| r.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum();
    assert!(
        chunks > 1000,
        "the floods sent {chunks} chunks: {reports:?}"
    );
    assert!(rounds >= 3, "root got through {rounds} rounds");
    assert!(
        failures.is_empty(),
        "root's operations failed: {failures:?}"
    );
    // At most one received descriptor per connection in service (one per
    // uid at a time, four workers), and 16 connections per uid.
    assert!(
        most_null <= null0 + 4,
        "received descriptors held: {null0} before, {most_null} during the floods"
    );
    assert!(
        most_sock <= sock0 + 2 * 16 + 4,
        "sockets: {sock0} before, {most_sock} during the floods"
    );
    let log = m.log();
    assert!(!log.contains("Too many open files"), "EMFILE in the log");
    assert!(
        log.contains("descriptors sent after the first byte of a request"),
        "who sent them is logged"
    );
}
