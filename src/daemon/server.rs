//! The control socket's connection server: one dispatcher thread and a
//! fixed pool of workers, fed by a crossbeam channel.
//!
//! The dispatcher owns the listening socket and every idle connection and
//! waits on all of them with poll(2); an idle connection costs one
//! descriptor and no thread. When a connection has data, the dispatcher
//! hands it to a worker, which reads one request line (within
//! [`Limits::request`]), answers it and gives the connection back.
//!
//! Bounds, for every uid but root: open connections per uid and in total,
//! and connections in service at once per uid (so that a user who stalls
//! in the middle of a line holds one worker, not all). A connection over a
//! bound gets an error line and is closed; root and other users keep
//! working. Connections idle longer than [`Limits::idle`] are closed. An
//! accept that fails (EMFILE...) pauses accepting, doubling the pause up
//! to a second, and logs once per pause, not once per try.

use super::control::{self, Conn};
use crate::error::Error;
use crate::fuse::Core;
use crate::lograte;
use crate::service::Caller;
use crate::sys::socket;
use crossbeam_channel::{Receiver, Sender};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bounds of the control socket.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Worker threads.
    pub workers: usize,
    /// Open connections per uid (root: unbounded).
    pub per_uid: usize,
    /// Open connections of all uids but root together.
    pub total: usize,
    /// Connections of one uid (root: unbounded) in service at once.
    pub busy_per_uid: usize,
    /// A connection without a request for this long is closed.
    pub idle: Duration,
    /// A request line (and its answer) must go through within this time.
    pub request: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            workers: 4,
            per_uid: 16,
            total: 256,
            busy_per_uid: 1,
            idle: Duration::from_secs(30),
            request: Duration::from_secs(5),
        }
    }
}

/// What a worker gives back: the connection if it stays open.
struct Done {
    uid: u32,
    conn: Option<Conn>,
}

struct Dispatcher {
    lim: Limits,
    idle: Vec<Conn>,
    open: HashMap<u32, usize>,
    busy: HashMap<u32, usize>,
    total: usize,
}

impl Dispatcher {
    fn opened(&mut self, uid: u32) {
        *self.open.entry(uid).or_default() += 1;
        if uid != 0 {
            self.total += 1;
        }
    }

    fn closed(&mut self, uid: u32) {
        if let Some(n) = self.open.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&uid);
            }
        }
        if uid != 0 {
            self.total = self.total.saturating_sub(1);
        }
    }

    /// Why a new connection of `uid` is refused, if it is.
    fn refusal(&self, uid: u32) -> Option<String> {
        if uid == 0 {
            return None;
        }
        if self.open.get(&uid).copied().unwrap_or(0) >= self.lim.per_uid {
            return Some(format!(
                "too many control connections of uid {uid} (at most {} at once)",
                self.lim.per_uid
            ));
        }
        if self.total >= self.lim.total {
            return Some(format!(
                "too many control connections (at most {} of users other than root)",
                self.lim.total
            ));
        }
        None
    }

    /// May a connection of `uid` be handed to a worker now?
    fn may_serve(&self, uid: u32) -> bool {
        uid == 0 || self.busy.get(&uid).copied().unwrap_or(0) < self.lim.busy_per_uid
    }

    fn admit(&mut self, s: UnixStream) {
        let who = match (socket::peer_cred(&s), socket::peer_groups(&s)) {
            (Ok((pid, uid, gid)), Ok(groups)) => Caller {
                uid,
                gid,
                pid,
                groups: Some(groups.into()),
            },
            (Err(e), _) | (_, Err(e)) => {
                if let Some(d) = lograte::CONTROL.allow(u64::MAX) {
                    log::warn!(
                        "control socket: cannot read peer credentials: {e}{}",
                        lograte::dropped_note(d)
                    );
                }
                return;
            }
        };
        if let Some(why) = self.refusal(who.uid) {
            if let Some(d) = lograte::CONTROL.allow(u64::from(who.uid)) {
                log::warn!(
                    "control: refused a connection: {why}{}",
                    lograte::dropped_note(d)
                );
            }
            refuse(s, Error::Busy(why));
            return;
        }
        self.opened(who.uid);
        self.idle.push(Conn::new(s, who));
    }
}

/// Answer a refused connection with one error line, without waiting for it.
fn refuse(mut s: UnixStream, e: Error) {
    let _ = s.set_nonblocking(true);
    let _ = s.write_all(&control::answer(Err(e)));
}

/// Serve the control socket forever.
pub fn serve(l: UnixListener, core: Arc<Core>, lim: Limits) {
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Conn>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let (wake_r, wake_w) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            log::error!("control socket: cannot make a wake-up pair: {e}; not serving");
            return;
        }
    };
    let _ = wake_r.set_nonblocking(true);
    let _ = wake_w.set_nonblocking(true);
    let _ = l.set_nonblocking(true);
    for i in 0..lim.workers.max(1) {
        let (rx, tx, core, lim) = (job_rx.clone(), done_tx.clone(), core.clone(), lim.clone());
        let Ok(wake) = wake_w.try_clone() else {
            continue;
        };
        let spawned = std::thread::Builder::new()
            .name(format!("control-{i}"))
            .spawn(move || worker(rx, tx, wake, core, lim));
        if let Err(e) = spawned {
            log::error!("control socket: cannot start worker {i}: {e}");
        }
    }
    let mut d = Dispatcher {
        lim,
        idle: Vec::new(),
        open: HashMap::new(),
        busy: HashMap::new(),
        total: 0,
    };
    let mut paused_until: Option<Instant> = None;
    let mut pause = Duration::ZERO;
    let mut wake_buf = [0u8; 64];
    loop {
        let now = Instant::now();
        let accepting = paused_until.is_none_or(|t| now >= t);
        // Poll set: the wake-up socket, the listener (unless paused), and
        // idle connections whose uid may be served now.
        let mut fds = vec![wake_r.as_fd()];
        if accepting {
            fds.push(l.as_fd());
        }
        let polled: Vec<usize> = (0..d.idle.len())
            .filter(|&i| d.may_serve(d.idle[i].who.uid))
            .collect();
        fds.extend(polled.iter().map(|&i| d.idle[i].stream.as_fd()));
        // Connections with a whole request already buffered need no poll.
        let buffered = polled.iter().any(|&i| d.idle[i].has_line());
        let timeout = if buffered {
            0
        } else if let Some(t) = paused_until.filter(|_| !accepting) {
            t.saturating_duration_since(now).as_millis().clamp(1, 1000) as i32
        } else {
            1000
        };
        let ready = match socket::poll_readable(&fds, timeout) {
            Ok(r) => r,
            Err(e) => {
                log::error!("control socket: poll: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        drop(fds);
        while (&wake_r).read(&mut wake_buf).is_ok_and(|n| n > 0) {}
        while let Ok(done) = done_rx.try_recv() {
            if let Some(n) = d.busy.get_mut(&done.uid) {
                *n = n.saturating_sub(1);
            }
            match done.conn {
                Some(mut c) => {
                    c.since = Instant::now();
                    d.idle.push(c);
                }
                None => d.closed(done.uid),
            }
        }
        let base = if accepting { 2 } else { 1 };
        if accepting && ready.get(1).copied().unwrap_or(false) {
            for _ in 0..64 {
                match l.accept() {
                    Ok((s, _)) => {
                        pause = Duration::ZERO;
                        d.admit(s);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        pause =
                            (pause * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                        paused_until = Some(Instant::now() + pause);
                        if let Some(dr) = lograte::CONTROL.allow(u64::MAX - 1) {
                            log::warn!(
                                "control socket: accept failed: {e}; pausing accept for {} ms{}",
                                pause.as_millis(),
                                lograte::dropped_note(dr)
                            );
                        }
                        break;
                    }
                }
            }
        }
        // Hand ready connections to workers; `polled` indexes d.idle as it
        // was before new connections were pushed, so remove from the back.
        let mut take: Vec<usize> = polled
            .iter()
            .enumerate()
            .filter(|&(k, &i)| {
                ready.get(base + k).copied().unwrap_or(false) || d.idle[i].has_line()
            })
            .map(|(_, &i)| i)
            .collect();
        take.sort_unstable();
        for i in take.into_iter().rev() {
            let uid = d.idle[i].who.uid;
            if !d.may_serve(uid) {
                continue;
            }
            let c = d.idle.swap_remove(i);
            *d.busy.entry(uid).or_default() += 1;
            if let Err(e) = job_tx.send(c) {
                log::error!("control socket: workers are gone: {e}");
                return;
            }
        }
        // Close connections idle too long.
        let idle_for = d.lim.idle;
        let mut i = 0;
        while i < d.idle.len() {
            if d.idle[i].since.elapsed() > idle_for {
                let c = d.idle.swap_remove(i);
                d.closed(c.who.uid);
            } else {
                i += 1;
            }
        }
    }
}

fn worker(
    rx: Receiver<Conn>,
    tx: Sender<Done>,
    mut wake: UnixStream,
    core: Arc<Core>,
    lim: Limits,
) {
    for mut c in rx {
        let uid = c.who.uid;
        // A panic in a request must not take a worker (and its slot) away.
        let keep = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            control::serve_one(&core, &mut c, lim.request)
        }))
        .unwrap_or(false);
        if tx
            .send(Done {
                uid,
                conn: keep.then_some(c),
            })
            .is_err()
        {
            return;
        }
        let _ = wake.write(&[1]);
    }
}
