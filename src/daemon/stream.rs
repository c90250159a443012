//! Streaming requests of the control socket (`export`, later send and
//! receive): each runs on a thread of its own, outside the fixed worker
//! pool, within a global cap and a per-uid cap (EBUSY beyond).
//!
//! A stream thread owns its connection. It runs the service call on a
//! scoped thread with a [`Job`], and meanwhile watches the connection:
//! every [`TICK`] it sends a progress line when the counters moved, and it
//! cancels the job when the client hangs up, closes its end, sends
//! `{"cancel":true}`, or stops taking progress lines. The service call then
//! stops, undoes what it made and returns `Error::Cancelled`; the final
//! answer line goes to a client that is still there. [`Streams::stop`]
//! cancels every stream and joins its thread (daemon shutdown).

use super::control::{self, Conn};
use super::proto::{ClientLine, Op, Progress, VERSION};
use crate::error::{Error, Result};
use crate::service::{Job, Service};
use crate::sys::scm;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often progress is sent and the client is checked.
const TICK: Duration = Duration::from_millis(200);

/// Why a stream was cancelled, when the client said so.
const ASKED: &str = "the client asked";

/// A client that takes no progress line for this long is gone.
const WRITE_LIMIT: Duration = Duration::from_secs(10);

/// Bounds of streaming requests.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Streams at once, all users together.
    pub total: usize,
    /// Streams at once of one uid (root: only the total).
    pub per_uid: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            total: 8,
            per_uid: 2,
        }
    }
}

#[derive(Default)]
struct State {
    per_uid: HashMap<u32, usize>,
    running: usize,
    jobs: HashMap<u64, Arc<Job>>,
    threads: Vec<JoinHandle<()>>,
    next: u64,
    stopped: bool,
}

/// The running streams: counts, jobs and threads.
pub struct Streams {
    lim: StreamLimits,
    st: Mutex<State>,
}

/// A stream's place in the counts; given back on drop.
struct Slot {
    streams: Arc<Streams>,
    uid: u32,
    key: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.streams.st.lock();
        st.running = st.running.saturating_sub(1);
        st.jobs.remove(&self.key);
        if let Some(n) = st.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_uid.remove(&self.uid);
            }
        }
    }
}

impl Streams {
    /// No stream yet.
    pub fn new(lim: StreamLimits) -> Arc<Streams> {
        Arc::new(Streams {
            lim,
            st: Mutex::new(State::default()),
        })
    }

    /// Take a slot for a stream of `uid`, or say why not.
    fn slot(self: &Arc<Self>, uid: u32, job: &Arc<Job>) -> Result<Slot> {
        let mut st = self.st.lock();
        if st.stopped {
            return Err(Error::Busy("the daemon is stopping".into()));
        }
        if st.running >= self.lim.total {
            return Err(Error::Busy(format!(
                "too many streaming requests (at most {} at once)",
                self.lim.total
            )));
        }
        let mine = st.per_uid.get(&uid).copied().unwrap_or(0);
        if uid != 0 && mine >= self.lim.per_uid {
            return Err(Error::Busy(format!(
                "too many streaming requests of uid {uid} (at most {} at once)",
                self.lim.per_uid
            )));
        }
        st.running += 1;
        *st.per_uid.entry(uid).or_default() += 1;
        st.next += 1;
        let key = st.next;
        st.jobs.insert(key, job.clone());
        // Reap threads that are done.
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut st.threads)
            .into_iter()
            .partition(|t| t.is_finished());
        st.threads = live;
        drop(st);
        for t in done {
            let _ = t.join();
        }
        Ok(Slot {
            streams: self.clone(),
            uid,
            key,
        })
    }

    /// Run streaming request `op` of connection `c` on a thread of its own;
    /// `ended` is called when the stream is over and its connection
    /// closed. A request over the bounds is answered EBUSY here.
    pub fn start(
        self: &Arc<Self>,
        service: Arc<Service>,
        mut c: Conn,
        op: Op,
        fds: Vec<OwnedFd>,
        ended: impl Fn(u32) + Clone + Send + 'static,
    ) {
        let uid = c.who.uid;
        let job = Job::new();
        let slot = match self.slot(uid, &job) {
            Ok(s) => s,
            Err(e) => {
                control::log_outcome(&c.who, &op, &Err::<(), _>(Error::Busy(e.to_string())));
                let _ = control::send(&mut c.stream, Err(e), Duration::from_secs(1));
                drop(c);
                ended(uid);
                return;
            }
        };
        let ended2 = ended.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("stream-{}", slot.key))
            .spawn(move || {
                // A panic anywhere in the stream fails this request alone:
                // the client gets an answer, and the slot and the
                // connection's count are given back below.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&service, &mut c, &op, fds, &job)
                }));
                if ran.is_err() {
                    job.cancel();
                    let e = panicked();
                    control::log_outcome(&c.who, &op, &Err::<(), _>(panicked()));
                    let _ = control::send(&mut c.stream, Err(e), Duration::from_secs(1));
                }
                drop(c);
                drop(service);
                drop(slot);
                ended2(uid);
            });
        match spawned {
            Ok(t) => self.st.lock().threads.push(t),
            // The closure (connection, slot) is dropped: the client sees
            // its connection close; the count is given back.
            Err(e) => {
                log::error!("control: cannot start a stream thread: {e}");
                ended(uid);
            }
        }
    }

    /// Cancel every stream and wait for its thread (daemon shutdown).
    pub fn stop(&self) {
        let threads = {
            let mut st = self.st.lock();
            st.stopped = true;
            for j in st.jobs.values() {
                j.cancel();
            }
            std::mem::take(&mut st.threads)
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The error of a stream whose thread panicked (a bug).
fn panicked() -> Error {
    Error::io(
        "the stream operation",
        std::io::Error::other(
            "it panicked (a bug, see the daemon's log); only this request failed",
        ),
    )
}

/// Test hook: `THINFS_FAILPOINT=stream.panic` panics in the operation's
/// thread, `stream.panic-watch` in the stream's own thread once the
/// operation is done. Only with the `failpoints` feature (test builds).
#[cfg(feature = "failpoints")]
fn panic_point(name: &str) {
    static FP: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if FP
        .get_or_init(|| std::env::var("THINFS_FAILPOINT").ok())
        .as_deref()
        == Some(name)
    {
        panic!("failpoint {name}: a panic in a stream");
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn panic_point(_name: &str) {}

/// The service call of a streaming request.
fn call(
    service: &Service,
    c: &Conn,
    op: &Op,
    fds: Vec<OwnedFd>,
    job: &Job,
) -> Result<serde_json::Value> {
    let mut fds = fds.into_iter();
    panic_point("stream.panic");
    let mut next = || {
        fds.next()
            .map(std::fs::File::from)
            .ok_or_else(|| Error::Invalid(format!("{} lacks a descriptor", op.summary())))
    };
    match op {
        Op::Export(req) => control::to_json(service.export(&c.who, req, next()?, job)?),
        Op::Send(req) => control::to_json(service.send(&c.who, req, next()?, job)?),
        Op::Receive(req) => control::to_json(service.receive(&c.who, req, next()?, job)?),
        Op::Import(req) => control::to_json(service.import(&c.who, req, next()?, job)?),
        Op::Backup(req) => control::to_json(service.backup(&c.who, req, next()?, job)?),
        Op::Restore(req) => control::to_json(service.restore(&c.who, req, next()?, job)?),
        _ => Err(Error::Invalid(format!(
            "{} is not a streaming request",
            op.summary()
        ))),
    }
}

/// Run one streaming request to its end, watching the client.
fn run(service: &Service, c: &mut Conn, op: &Op, fds: Vec<OwnedFd>, job: &Arc<Job>) {
    let who = c.who.clone();
    let mut why_cancelled: Option<&'static str> = None;
    let res = std::thread::scope(|s| {
        let conn: &Conn = c;
        let worker = std::thread::Builder::new()
            .name("stream-op".into())
            .spawn_scoped(s, || call(service, conn, op, fds, job));
        let worker = match worker {
            Ok(w) => w,
            Err(e) => return Err(Error::io("start a stream thread", e)),
        };
        let mut last: Option<(u64, Option<u64>)> = None;
        let mut stream = &conn.stream;
        let mut buf = [0u8; 256];
        let mut pending = Vec::new();
        while !worker.is_finished() {
            match scm::poll_in_or_hup(stream.as_fd(), TICK.as_millis() as i32) {
                Ok((_, true)) => why_cancelled = why_cancelled.or(Some("the client hung up")),
                Ok((true, false)) => match stream.read(&mut buf) {
                    Ok(0) => why_cancelled = why_cancelled.or(Some("the client closed")),
                    Ok(n) => {
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                            let l: Vec<u8> = pending.drain(..=i).collect();
                            if serde_json::from_slice::<ClientLine>(&l).is_ok_and(|l| l.cancel) {
                                why_cancelled = why_cancelled.or(Some(ASKED));
                            }
                        }
                        pending.truncate(4096);
                    }
                    Err(_) => why_cancelled = why_cancelled.or(Some("the client is gone")),
                },
                Ok(_) => {}
                Err(_) => why_cancelled = why_cancelled.or(Some("the client is gone")),
            }
            if why_cancelled.is_some() {
                job.cancel();
                // Wait for the operation to undo, without busy-polling a
                // hung-up socket.
                while !worker.is_finished() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                break;
            }
            let p = job.progress();
            if last != Some(p) {
                last = Some(p);
                if progress(&mut stream, p).is_err() {
                    why_cancelled = Some("the client takes no progress");
                    job.cancel();
                }
            }
        }
        worker.join().unwrap_or_else(|_| Err(panicked()))
    });
    panic_point("stream.panic-watch");
    match (&res, why_cancelled) {
        (Err(Error::Cancelled(_)), Some(why)) => {
            control::log_outcome(
                &who,
                op,
                &Err::<(), _>(Error::Cancelled(format!("{why}; undone"))),
            );
        }
        _ => control::log_outcome(&who, op, &res),
    }
    // A client that asked to cancel is still there to read the answer.
    if matches!(why_cancelled, None | Some(ASKED)) {
        let (done, total) = job.progress();
        let _ = progress(&mut &c.stream, (done, total));
        let _ = control::send(&mut c.stream, res, WRITE_LIMIT);
    }
}

/// Send one progress line, within [`WRITE_LIMIT`].
fn progress(
    out: &mut &std::os::unix::net::UnixStream,
    (done, total): (u64, Option<u64>),
) -> std::io::Result<()> {
    let line = serde_json::json!({ "v": VERSION, "progress": Progress { done, total } });
    let mut b = serde_json::to_vec(&line).unwrap_or_default();
    b.push(b'\n');
    out.set_write_timeout(Some(WRITE_LIMIT))?;
    let t0 = Instant::now();
    let r = out.write_all(&b);
    if t0.elapsed() >= WRITE_LIMIT {
        return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_uid_and_in_total() {
        let s = Streams::new(StreamLimits {
            total: 2,
            per_uid: 1,
        });
        let j = Job::new();
        let a = s.slot(1000, &j).unwrap();
        let e = s.slot(1000, &j).err().unwrap();
        assert_eq!(e.errno(), libc::EBUSY);
        assert!(e.to_string().contains("uid 1000"), "{e}");
        let b = s.slot(0, &j).unwrap();
        let e = s.slot(0, &j).err().unwrap();
        assert!(e.to_string().contains("at most 2"), "{e}");
        drop(a);
        let _c = s.slot(1000, &j).unwrap();
        drop(b);
        // Stopping cancels every running job and refuses new ones.
        s.stop();
        assert!(j.is_cancelled());
        assert_eq!(s.slot(7, &Job::new()).err().unwrap().errno(), libc::EBUSY);
    }
}
