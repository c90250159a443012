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
//!
//! Streaming requests leave the pool: a worker hands them to
//! [`super::stream::Streams`], which runs each on a thread of its own.
//! [`Server`] owns every one of these threads: [`Server::stop`] (or drop)
//! stops the dispatcher, lets the workers finish the request they serve,
//! cancels the streams, and joins them all, so that nothing holds the
//! service (and its engine) after shutdown.

use super::control::{self, Conn, Served};
use super::stream::{StreamLimits, Streams};
use crate::error::{Error, IoContext, Result};
use crate::lograte;
use crate::service::{Caller, Service};
use crate::sys::socket;
use crossbeam_channel::{Receiver, Sender};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
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
    /// Streaming requests.
    pub streams: StreamLimits,
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
            streams: StreamLimits::default(),
        }
    }
}

/// What a worker or a stream gives back.
enum Done {
    /// A worker served a request: the connection if it stays open.
    Served { uid: u32, conn: Option<Conn> },
    /// A worker handed the connection to a stream (it stays counted).
    HandedOff { uid: u32 },
    /// A stream ended and closed its connection.
    StreamEnded { uid: u32 },
}

/// The way back to the dispatcher: its channel and its wake-up socket.
#[derive(Clone)]
struct Back {
    tx: Sender<Done>,
    wake: Arc<UnixStream>,
}

impl Back {
    fn send(&self, d: Done) -> bool {
        let ok = self.tx.send(d).is_ok();
        let _ = (&*self.wake).write(&[1]);
        ok
    }
}

/// The control server's threads: the dispatcher (which owns the workers)
/// and the streams. Stops and joins them on [`Server::stop`] or drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    wake: Arc<UnixStream>,
    dispatcher: Option<JoinHandle<()>>,
    streams: Arc<Streams>,
}

impl Server {
    /// Serve `l` with `service` on threads of its own.
    pub fn start(l: UnixListener, service: Arc<Service>, lim: Limits) -> Result<Server> {
        let (wake_r, wake_w) = UnixStream::pair().ctx(|| "control socket wake-up pair".into())?;
        wake_r
            .set_nonblocking(true)
            .and_then(|_| wake_w.set_nonblocking(true))
            .and_then(|_| l.set_nonblocking(true))
            .ctx(|| "control socket non-blocking".into())?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(wake_w);
        let streams = Streams::new(lim.streams.clone());
        let (st, wk, ss) = (stop.clone(), wake.clone(), streams.clone());
        let dispatcher = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(l, service, lim, st, wake_r, wk, ss))
            .ctx(|| "start control socket thread".into())?;
        Ok(Server {
            stop,
            wake,
            dispatcher: Some(dispatcher),
            streams,
        })
    }

    /// Stop accepting, let workers finish the request they serve, cancel
    /// every stream, and join every thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&*self.wake).write(&[1]);
        self.streams.stop();
        if let Some(t) = self.dispatcher.take() {
            let _ = t.join();
        }
        // Streams handed off while the dispatcher was stopping.
        self.streams.stop();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
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

/// The dispatcher: serve the control socket until `stop`, then close
/// the workers' channel and join them.
fn serve(
    l: UnixListener,
    service: Arc<Service>,
    lim: Limits,
    stop: Arc<AtomicBool>,
    wake_r: UnixStream,
    wake_w: Arc<UnixStream>,
    streams: Arc<Streams>,
) {
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Conn>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let back = Back {
        tx: done_tx,
        wake: wake_w,
    };
    let mut workers = Vec::new();
    for i in 0..lim.workers.max(1) {
        let (rx, back, service, lim, streams) = (
            job_rx.clone(),
            back.clone(),
            service.clone(),
            lim.clone(),
            streams.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("control-{i}"))
            .spawn(move || worker(rx, back, service, lim, streams));
        match spawned {
            Ok(t) => workers.push(t),
            Err(e) => log::error!("control socket: cannot start worker {i}: {e}"),
        }
    }
    drop((job_rx, service, streams, back));
    dispatch(&l, &lim, &stop, &wake_r, &job_tx, &done_rx);
    drop(job_tx);
    for t in workers {
        let _ = t.join();
    }
}

/// The dispatcher's loop, until `stop`.
fn dispatch(
    l: &UnixListener,
    lim: &Limits,
    stop: &AtomicBool,
    wake_r: &UnixStream,
    job_tx: &Sender<Conn>,
    done_rx: &Receiver<Done>,
) {
    let lim = lim.clone();
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
    while !stop.load(Ordering::SeqCst) {
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
        while (&*wake_r).read(&mut wake_buf).is_ok_and(|n| n > 0) {}
        while let Ok(done) = done_rx.try_recv() {
            let unbusy = |d: &mut Dispatcher, uid: u32| {
                if let Some(n) = d.busy.get_mut(&uid) {
                    *n = n.saturating_sub(1);
                }
            };
            match done {
                Done::Served { uid, conn } => {
                    unbusy(&mut d, uid);
                    match conn {
                        Some(mut c) => {
                            c.since = Instant::now();
                            d.idle.push(c);
                        }
                        None => d.closed(uid),
                    }
                }
                Done::HandedOff { uid } => unbusy(&mut d, uid),
                Done::StreamEnded { uid } => d.closed(uid),
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
    back: Back,
    service: Arc<Service>,
    lim: Limits,
    streams: Arc<Streams>,
) {
    for mut c in rx {
        let uid = c.who.uid;
        // A panic in a request must not take a worker (and its slot) away.
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            control::serve_one(&service, &mut c, lim.request)
        }))
        .unwrap_or(Served::Close);
        let done = match served {
            Served::Keep => Done::Served { uid, conn: Some(c) },
            Served::Close => Done::Served { uid, conn: None },
            Served::Stream(op, fds) => {
                let b = back.clone();
                streams.start(service.clone(), c, op, fds, move |uid| {
                    b.send(Done::StreamEnded { uid });
                });
                Done::HandedOff { uid }
            }
        };
        if !back.send(done) {
            return;
        }
    }
}
