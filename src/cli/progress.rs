//! Progress bars of the streaming verbs (export, send, receive): drawn on
//! stderr only when stderr is a terminal and `--quiet` was not given.

use crate::daemon::proto::Progress;
use crate::sys::scm;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar on stderr, if stderr is a terminal and not `quiet`.
pub fn bar(quiet: bool) -> Option<ProgressBar> {
    if quiet || !scm::is_tty(std::io::stderr()) {
        return None;
    }
    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{wide_bar}] {binary_bytes}/{binary_total_bytes} \
         {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    b.set_style(style);
    Some(b)
}

/// Show one progress line of the daemon on `b`.
pub fn show(b: &Option<ProgressBar>, p: Progress) {
    if let Some(b) = b {
        if let Some(t) = p.total {
            b.set_length(t.max(p.done));
        }
        b.set_position(p.done);
    }
}
