//! Who asks: the identity a front end captures once per request (FUSE) or
//! per connection (control socket), handed to the service with the request.

use crate::sys::creds;
use std::sync::Arc;

/// Who sent a request (FUSE request or control-socket peer).
#[derive(Debug, Clone)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id; for a FUSE request the id of the sending *thread*
    /// (whose supplementary groups are the ones that count).
    pub pid: u32,
    /// Supplementary groups, when captured with the identity (the control
    /// socket takes them at connect with SO_PEERGROUPS). `None`: read them
    /// for thread `pid` on every request, from that thread only if it is
    /// still the sender (see [`creds::groups_of`]).
    pub groups: Option<Arc<[u32]>>,
}

impl Caller {
    /// Supplementary groups of the caller; none if they cannot be read
    /// (fewer rights, never more).
    pub fn groups(&self) -> Arc<[u32]> {
        self.try_groups().unwrap_or_else(|_| Arc::from(Vec::new()))
    }

    /// Supplementary groups of the caller: the captured ones, or those of
    /// the sending thread read now (never cached: a thread that drops a
    /// group loses it for its next request).
    pub fn try_groups(&self) -> std::io::Result<Arc<[u32]>> {
        match &self.groups {
            Some(g) => Ok(g.clone()),
            None => creds::groups_of(self.pid, self.uid, self.gid).map(Arc::from),
        }
    }
}
