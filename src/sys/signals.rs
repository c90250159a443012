//! Signals for the daemon: block SIGINT/SIGTERM/SIGHUP in every thread and
//! take them synchronously in one thread with `sigwait`.

use std::io;

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGTERM);
        libc::sigaddset(&mut s, libc::SIGHUP);
        s
    }
}

/// Block the stop signals in this thread and every thread it spawns later.
pub fn block_stop_signals() -> io::Result<()> {
    let s = set();
    // SAFETY: s is a valid set; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Wait for a stop signal; returns its number.
pub fn wait_stop_signal() -> io::Result<i32> {
    let s = set();
    let mut sig: libc::c_int = 0;
    // SAFETY: s is a valid set and sig a valid out-parameter.
    let r = unsafe { libc::sigwait(&s, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}
