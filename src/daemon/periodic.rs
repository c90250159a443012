//! A periodic task on a thread of its own that stops at once when asked
//! (a condition variable, not a sleep loop) and is joined by its owner.

use crate::error::{IoContext, Result};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running periodic task; stopped and joined on [`Periodic::stop`] or
/// drop.
pub struct Periodic {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Periodic {
    /// Run `f` every `every` on a thread named `name`.
    pub fn start(
        name: &str,
        every: Duration,
        mut f: impl FnMut() + Send + 'static,
    ) -> Result<Periodic> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                loop {
                    let deadline = Instant::now() + every;
                    let mut stopped = s.0.lock();
                    while !*stopped && Instant::now() < deadline {
                        s.1.wait_until(&mut stopped, deadline);
                    }
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    f();
                }
            })
            .ctx(|| format!("start the {name} thread"))?;
        Ok(Periodic {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop the task (after the run under way, if any) and join it.
    pub fn stop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_and_stops_at_once() {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        let mut p = Periodic::start("t", Duration::from_millis(10), move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        p.stop();
        let seen = n.load(Ordering::SeqCst);
        assert!(seen >= 2, "ran {seen} times");
        // A long period does not delay the stop.
        let mut q = Periodic::start("t", Duration::from_secs(3600), || {}).unwrap();
        let t0 = Instant::now();
        q.stop();
        assert!(t0.elapsed() < Duration::from_secs(1));
        // The closure (and what it holds) is gone after stop.
        assert_eq!(Arc::strong_count(&n), 1);
    }
}
