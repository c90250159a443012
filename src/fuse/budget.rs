//! What users' open handles may cost the daemon: a share per uid of the
//! handles that hold a descriptor or memory in the daemon, so that no user
//! can run it out of descriptors (EMFILE for everyone) or memory.
//!
//! The figures come from the daemon's open-file limit `L` (RLIMIT_NOFILE,
//! read at start, after the daemon raised it to its hard limit):
//! - cached inodes keep at most `L/2` descriptors (`inode`, evicting);
//! - handles of users other than root: `L/4` in all (the pool), at most
//!   `L/16` per uid (the share); a uid holding fewer than `L/256` (at
//!   least 4) still gets one when the pool is full, so that a new user is
//!   never refused because others hold the pool;
//! - the last quarter is the reserve of root and of the daemon's own work
//!   (devices, mounts, snapshots, the control socket, streams).
//!
//! Counted handles: directory handles, file handles without kernel
//! passthrough (both hold a descriptor), and handles of `.thinfs` files and
//! virtual directories (memory). A passthrough file handle holds no
//! descriptor: the kernel keeps the backing file; it counts only against a
//! much larger per-uid bound (`4 L`), for the daemon's memory. Root is
//! counted, never refused.
//!
//! Rendered `.thinfs` contents and virtual listings are shared between
//! handles (`control`); a uid may pin at most [`PIN_SHARE`] bytes of
//! distinct copies (old renderings kept alive by its open handles), or one
//! copy whatever its size.

use crate::error::{Error, Result};
use crate::lograte::{self, RateLimit};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

/// Bytes of distinct rendered copies one uid may keep alive.
pub const PIN_SHARE: usize = 32 << 20;

/// Lines about refused opens, keyed by uid.
static REFUSED: LazyLock<RateLimit> = LazyLock::new(RateLimit::default);

/// What a handle holds in the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A passthrough file handle: no descriptor, a little memory.
    Light,
    /// A handle holding memory only (`.thinfs`, virtual directories).
    Memory,
    /// A handle holding a descriptor (directory, file without passthrough).
    Fd,
}

/// One uid's handles.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Usage {
    /// Counted handles (descriptor or memory).
    pub handles: usize,
    /// Of them, those holding a descriptor.
    pub fds: usize,
    /// Passthrough file handles (no descriptor).
    pub passthrough: usize,
    /// Bytes of distinct rendered copies its handles keep alive.
    pub pinned_bytes: usize,
    #[serde(skip)]
    pins: HashMap<usize, (usize, usize)>,
}

#[derive(Debug, Default)]
struct State {
    by_uid: HashMap<u32, Usage>,
    /// Counted handles of users other than root.
    users: usize,
}

/// The per-uid bounds and what is held.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    share: usize,
    pool: usize,
    floor: usize,
    light: usize,
    state: Mutex<State>,
}

/// A shared copy a handle keeps alive: its address (the key) and size.
#[derive(Debug, Clone, Copy)]
pub struct Pin {
    key: usize,
    bytes: usize,
}

impl Pin {
    /// The pin of a shared value of `bytes` bytes.
    pub fn of<T: ?Sized>(v: &Arc<T>, bytes: usize) -> Pin {
        Pin {
            key: Arc::as_ptr(v) as *const u8 as usize,
            bytes,
        }
    }
}

/// What one handle holds, given back when the handle is dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    uid: u32,
    kind: Kind,
    pin: Option<Pin>,
}

impl Held {
    /// What it holds.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(self.uid, self.kind, self.pin);
    }
}

/// The figures, for `.thinfs/pool.json`.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The daemon's open-file limit the bounds come from.
    pub nofile: u64,
    /// Counted handles one uid may hold.
    pub share: usize,
    /// Counted handles all users but root may hold.
    pub pool: usize,
    /// Counted handles users other than root hold now.
    pub held: usize,
    /// Passthrough handles one uid may hold.
    pub passthrough_share: usize,
    /// Bytes of rendered copies one uid may keep alive.
    pub pin_share: usize,
    /// Per uid (the 32 holding most), as strings for JSON keys.
    pub by_uid: std::collections::BTreeMap<String, Usage>,
}

fn emfile(what: String) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(libc::EMFILE))
}

impl Budget {
    /// Bounds derived from an open-file limit of `limit`.
    pub fn new(limit: u64) -> Budget {
        let l = limit.clamp(64, 1 << 30) as usize;
        let pool = l / 4;
        let share = (l / 16).max(8);
        Budget {
            limit,
            share,
            pool,
            floor: (l / 256).max(4),
            light: l.saturating_mul(4),
            state: Mutex::new(State::default()),
        }
    }

    /// Bounds from this process's open-file limit.
    pub fn from_rlimit() -> Budget {
        Budget::new(crate::sys::handle::nofile_limit())
    }

    /// Take what a new handle of `uid` holds, or EMFILE if that is over
    /// the uid's share (with a rate-limited log line saying so).
    pub fn take(self: &Arc<Self>, uid: u32, kind: Kind, pin: Option<Pin>) -> Result<Held> {
        let mut s = self.state.lock();
        let users = s.users;
        let u = s.by_uid.entry(uid).or_default();
        let new_pin = pin.filter(|p| !u.pins.contains_key(&p.key));
        let refusal = if uid == 0 {
            None
        } else if kind == Kind::Light {
            (u.passthrough >= self.light).then(|| {
                format!(
                    "uid {uid} holds {} passthrough handles (at most {})",
                    u.passthrough, self.light
                )
            })
        } else if u.handles >= self.share {
            Some(format!(
                "uid {uid} holds {} open handles in the daemon (its share is {} of the daemon's {} descriptors)",
                u.handles, self.share, self.limit
            ))
        } else if users >= self.pool && u.handles >= self.floor {
            Some(format!(
                "users hold {users} open handles in the daemon (all of the {} users may hold; uid {uid} holds {})",
                self.pool, u.handles
            ))
        } else if let Some(p) = new_pin
            && u.pinned_bytes > 0
            && u.pinned_bytes + p.bytes > PIN_SHARE
        {
            Some(format!(
                "uid {uid} keeps {} bytes of .thinfs renderings alive (at most {PIN_SHARE})",
                u.pinned_bytes
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            if u.handles == 0 && u.passthrough == 0 && u.pins.is_empty() {
                s.by_uid.remove(&uid);
            }
            drop(s);
            if let Some(d) = REFUSED.allow(uid as u64) {
                log::warn!("open refused (EMFILE): {why}{}", lograte::dropped_note(d));
            }
            return Err(emfile(why));
        }
        match kind {
            Kind::Light => u.passthrough += 1,
            Kind::Memory => u.handles += 1,
            Kind::Fd => {
                u.handles += 1;
                u.fds += 1;
            }
        }
        if let Some(p) = pin {
            let e = u.pins.entry(p.key).or_insert((0, p.bytes));
            if e.0 == 0 {
                u.pinned_bytes += p.bytes;
            }
            e.0 += 1;
        }
        if uid != 0 && kind != Kind::Light {
            s.users += 1;
        }
        Ok(Held {
            budget: self.clone(),
            uid,
            kind,
            pin,
        })
    }

    fn give_back(&self, uid: u32, kind: Kind, pin: Option<Pin>) {
        let mut s = self.state.lock();
        if uid != 0 && kind != Kind::Light {
            s.users = s.users.saturating_sub(1);
        }
        let Some(u) = s.by_uid.get_mut(&uid) else {
            return;
        };
        match kind {
            Kind::Light => u.passthrough = u.passthrough.saturating_sub(1),
            Kind::Memory => u.handles = u.handles.saturating_sub(1),
            Kind::Fd => {
                u.handles = u.handles.saturating_sub(1);
                u.fds = u.fds.saturating_sub(1);
            }
        }
        if let Some(p) = pin
            && let Some(e) = u.pins.get_mut(&p.key)
        {
            e.0 -= 1;
            if e.0 == 0 {
                u.pinned_bytes = u.pinned_bytes.saturating_sub(e.1);
                u.pins.remove(&p.key);
            }
        }
        if u.handles == 0 && u.passthrough == 0 && u.pins.is_empty() {
            s.by_uid.remove(&uid);
        }
    }

    /// The bounds and what the 32 uids holding most hold.
    pub fn report(&self) -> Report {
        let s = self.state.lock();
        let mut v: Vec<(&u32, &Usage)> = s.by_uid.iter().collect();
        v.sort_by_key(|(uid, u)| (std::cmp::Reverse(u.handles + u.passthrough), **uid));
        Report {
            nofile: self.limit,
            share: self.share,
            pool: self.pool,
            held: s.users,
            passthrough_share: self.light,
            pin_share: PIN_SHARE,
            by_uid: v
                .into_iter()
                .take(32)
                .map(|(uid, u)| (uid.to_string(), u.clone()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_over_its_share_is_refused_and_nobody_else() {
        let b = Arc::new(Budget::new(400));
        assert_eq!((b.share, b.pool, b.floor), (25, 100, 4));
        let mut held = Vec::new();
        for _ in 0..25 {
            held.push(b.take(65534, Kind::Fd, None).unwrap());
        }
        let e = b.take(65534, Kind::Memory, None).unwrap_err();
        assert_eq!(e.errno(), libc::EMFILE);
        // Passthrough handles are not in the share.
        held.push(b.take(65534, Kind::Light, None).unwrap());
        // Others fill the pool; a newcomer still gets its floor.
        for uid in 1000..1003 {
            for _ in 0..25 {
                held.push(b.take(uid, Kind::Fd, None).unwrap());
            }
        }
        assert_eq!(b.report().held, 100);
        for _ in 0..4 {
            held.push(b.take(2000, Kind::Fd, None).unwrap());
        }
        assert!(b.take(2000, Kind::Fd, None).is_err());
        // Root is never refused.
        for _ in 0..500 {
            held.push(b.take(0, Kind::Fd, None).unwrap());
        }
        drop(held);
        let r = b.report();
        assert_eq!(r.held, 0);
        assert!(r.by_uid.is_empty(), "{:?}", r.by_uid);
    }

    #[test]
    fn distinct_copies_count_once_each() {
        let b = Arc::new(Budget::new(1 << 16));
        let big: Arc<[u8]> = vec![0u8; PIN_SHARE / 2 + 1].into();
        let other: Arc<[u8]> = vec![1u8; PIN_SHARE / 2 + 1].into();
        let mut held = Vec::new();
        for _ in 0..100 {
            held.push(
                b.take(7, Kind::Memory, Some(Pin::of(&big, big.len())))
                    .unwrap(),
            );
        }
        assert_eq!(b.report().by_uid["7"].pinned_bytes, big.len());
        // A second distinct copy would pass the bound.
        assert!(
            b.take(7, Kind::Memory, Some(Pin::of(&other, other.len())))
                .is_err()
        );
        drop(held);
        // Alone, one copy of any size is allowed.
        let h = b.take(7, Kind::Memory, Some(Pin::of(&other, other.len())));
        assert!(h.is_ok());
    }
}
