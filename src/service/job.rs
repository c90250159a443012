//! A long operation's shared state: progress and cancellation.
//!
//! A front end that runs a long operation (a stream sent or received, a
//! backup, an import or export) makes one [`Job`], hands it to the service
//! call, and keeps a clone: it reads [`Job::progress`] to report to its
//! client and calls [`Job::cancel`] when the client goes away. The service
//! call advances the counters and calls [`Job::check`] between steps; a
//! cancelled job makes it stop, undo what it made, and return
//! [`Error::Cancelled`]. No callbacks: the two sides only share atomics.

use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const UNKNOWN: u64 = u64::MAX;

/// Progress and cancellation of one long operation.
#[derive(Debug)]
pub struct Job {
    cancelled: AtomicBool,
    done: AtomicU64,
    total: AtomicU64,
}

impl Job {
    /// A new job: nothing done, total unknown, not cancelled.
    pub fn new() -> Arc<Job> {
        Arc::new(Job {
            cancelled: AtomicBool::new(false),
            done: AtomicU64::new(0),
            total: AtomicU64::new(UNKNOWN),
        })
    }

    /// Ask the operation to stop (it notices at its next [`Job::check`]).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Has [`Job::cancel`] been called?
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// `Err(Error::Cancelled)` once the job is cancelled; `what` says what
    /// was being done, for the log and the client.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.is_cancelled() {
            return Err(Error::Cancelled(what.to_string()));
        }
        Ok(())
    }

    /// Set how many bytes the whole operation will move, if known.
    pub fn set_total(&self, total: Option<u64>) {
        self.total
            .store(total.unwrap_or(UNKNOWN), Ordering::Relaxed);
    }

    /// `n` more bytes done.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes done so far and the total, if known.
    pub fn progress(&self) -> (u64, Option<u64>) {
        let total = self.total.load(Ordering::Relaxed);
        (
            self.done.load(Ordering::Relaxed),
            (total != UNKNOWN).then_some(total),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_cancel() {
        let j = Job::new();
        assert_eq!(j.progress(), (0, None));
        j.set_total(Some(10));
        j.advance(4);
        assert_eq!(j.progress(), (4, Some(10)));
        assert!(j.check("x").is_ok());
        j.cancel();
        let e = j.check("sending a@b").unwrap_err();
        assert_eq!(e.errno(), libc::ECANCELED);
        assert!(e.to_string().contains("sending a@b"));
    }
}
