//! The service calls of `thinfs send`, `receive` and `haves`: rights,
//! request validation, and the choice of a base from the receiver's haves.
//! The engine does the work; the front end (control socket with passed
//! descriptors) only moves the request, the descriptor and the progress.

use super::{Caller, Job, Service};
use crate::engine::{Progress, Received, SendStats, Target};
use crate::error::{Error, Result};
use crate::meta::{DeviceKind, DeviceRecord};
use crate::types::Name;
use serde::{Deserialize, Serialize};

/// `thinfs send NAME@SNAP [-i SNAP | --haves FILE] [--compress]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// The snapshot to send: `NAME@SNAP`.
    pub target: String,
    /// `-i SNAP` (or `NAME@SNAP`): send only the difference from this
    /// older snapshot of the same image.
    #[serde(default)]
    pub incremental_from: Option<String>,
    /// `--haves FILE`: what the receiver has; the newest of those that is
    /// an older snapshot of the image becomes the base. Exclusive with
    /// `incremental_from`.
    #[serde(default)]
    pub haves: Option<Haves>,
    /// `--compress`: data records go LZ4-compressed where that shrinks
    /// them (the receiver needs no option).
    #[serde(default)]
    pub compress: bool,
    /// `-t TOKEN`: the rest of an interrupted stream (the token names the
    /// snapshot, base and offset; `target` is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
}

/// `thinfs receive NAME [-F] [-s]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveRequest {
    /// The image to create (full stream) or to add the snapshot to.
    pub name: String,
    /// `-F`: discard changes made to the image since its newest snapshot
    /// (never destroys a snapshot).
    #[serde(default)]
    pub force_rollback: bool,
    /// `-s`: an interrupted receive keeps its partial state, to be
    /// resumed by a `send -t TOKEN` stream.
    #[serde(default)]
    pub keep_partial: bool,
    /// `-A`: abandon the partial receive of `name` (the descriptor is not
    /// read).
    #[serde(default)]
    pub abandon: bool,
}

/// One snapshot in [`Haves`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveSnapshot {
    /// Snapshot name.
    pub name: String,
    /// Its identity: 32 hex digits (128 bits).
    pub id: String,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// `thinfs haves NAME --json`: an image's snapshots and identities, oldest
/// first; the input of `send --haves`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Haves {
    /// The image.
    pub image: String,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<HaveSnapshot>,
}

/// What a send did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendSummary {
    /// `NAME@SNAP` sent.
    pub snapshot: String,
    /// Its identity.
    pub id: String,
    /// The base snapshot's name, if incremental.
    pub base: Option<String>,
    /// The receiver has the snapshot already (`--haves`): nothing was
    /// written to the output, and the front end says "up to date".
    pub up_to_date: bool,
    /// Stream bytes, ranges, data and zero bytes.
    #[serde(flatten)]
    pub stats: SendStats,
}

/// What a receive made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveSummary {
    /// `NAME@SNAP` received.
    pub snapshot: String,
    /// Its identity.
    pub id: String,
    /// The image was created (full stream).
    pub created_image: bool,
    /// Changes since the newest snapshot were discarded (`-F`).
    pub rolled_back: bool,
    /// Stream bytes read.
    pub bytes: u64,
    /// Ranges written.
    pub ranges: u64,
    /// `-A`: the partial receive was abandoned (nothing received).
    #[serde(default)]
    pub abandoned: bool,
}

struct JobProgress<'a>(&'a Job, &'a str);

impl Progress for JobProgress<'_> {
    fn total(&self, n: u64) {
        self.0.set_total(Some(n));
    }
    fn advance(&self, n: u64) -> Result<()> {
        self.0.advance(n);
        self.0.check(self.1)
    }
}

impl Service {
    /// `thinfs haves NAME`: the image's snapshots with their identities.
    pub fn haves(&self, _c: &Caller, image: &Name) -> Result<Haves> {
        let e = self.engine();
        let id = e
            .image_id(image)?
            .ok_or_else(|| Error::NotFound(format!("no image named {image}")))?;
        let mut snaps = e.snapshots_of(id)?;
        snaps.sort_by_key(|s| s.seq);
        Ok(Haves {
            image: image.to_string(),
            snapshots: snaps
                .iter()
                .filter_map(|s| {
                    s.identity.map(|i| HaveSnapshot {
                        name: s.name.to_string(),
                        id: i.to_string(),
                        created: s.created,
                    })
                })
                .collect(),
        })
    }

    /// `thinfs send`: write the stream to `out`. A raw block stream
    /// bypasses every file permission, so this needs root or the admin group.
    pub fn send(
        &self,
        c: &Caller,
        req: &SendRequest,
        mut out: std::fs::File,
        job: &Job,
    ) -> Result<SendSummary> {
        if let Some(tok) = &req.resume_token {
            return self.send_resume(c, req, tok, out, job);
        }
        self.require_admin(c, &format!("send {}", req.target))?;
        let t = Target::parse(&req.target)?;
        if t.snap.is_none() {
            return Err(Error::Invalid(format!(
                "send takes NAME@SNAP, got {}",
                req.target
            )));
        }
        let e = self.engine();
        let snap = e.resolve(&t)?;
        let id = snap
            .identity
            .ok_or_else(|| Error::Invalid(format!("{} has no identity", req.target)))?;
        let base = match (&req.incremental_from, &req.haves) {
            (Some(_), Some(_)) => {
                return Err(Error::Invalid(
                    "give either -i SNAP or --haves FILE, not both".into(),
                ));
            }
            (Some(b), None) => {
                let bn = b
                    .rsplit_once('@')
                    .map(|(i, s)| (Some(i), s))
                    .unwrap_or((None, b));
                if let Some(i) = bn.0
                    && i != t.image.as_str()
                {
                    return Err(Error::Invalid(format!(
                        "-i {b} is not a snapshot of {}",
                        t.image
                    )));
                }
                Some(e.resolve(&Target {
                    image: t.image.clone(),
                    snap: Some(Name::new(bn.1)?),
                })?)
            }
            (None, Some(h)) => {
                if h.snapshots.iter().any(|s| s.id == id.to_string()) {
                    return Ok(SendSummary {
                        snapshot: req.target.clone(),
                        id: id.to_string(),
                        base: None,
                        up_to_date: true,
                        stats: SendStats::default(),
                    });
                }
                self.base_from_haves(&snap, h)?
            }
            (None, None) => None,
        };
        let what = format!("sending {}", req.target);
        let stats = e.send_stream(
            &snap,
            base.as_ref(),
            req.compress,
            &mut out,
            &JobProgress(job, &what),
        )?;
        Ok(SendSummary {
            snapshot: req.target.clone(),
            id: id.to_string(),
            base: base.map(|b| b.name.to_string()),
            up_to_date: false,
            stats,
        })
    }

    /// `thinfs send -t TOKEN`.
    fn send_resume(
        &self,
        c: &Caller,
        req: &SendRequest,
        token: &str,
        mut out: std::fs::File,
        job: &Job,
    ) -> Result<SendSummary> {
        self.require_admin(c, "send -t (resume a stream)")?;
        if !req.target.is_empty() || req.incremental_from.is_some() || req.haves.is_some() {
            return Err(Error::Invalid(
                "send -t TOKEN takes no NAME@SNAP, -i or --haves: the token names the snapshot and base"
                    .into(),
            ));
        }
        let e = self.engine();
        let (snap, base, stats) =
            e.send_resume(token, &mut out, &JobProgress(job, "resuming a stream"))?;
        Ok(SendSummary {
            snapshot: e.full_name(&snap),
            id: snap.identity.map(|i| i.to_string()).unwrap_or_default(),
            base: base.map(|b| b.name.to_string()),
            up_to_date: false,
            stats,
        })
    }

    /// The newest snapshot older than `snap` in its image that the
    /// receiver has (by identity), if any.
    fn base_from_haves(&self, snap: &DeviceRecord, h: &Haves) -> Result<Option<DeviceRecord>> {
        let e = self.engine();
        let image = snap
            .parent
            .filter(|_| snap.kind == DeviceKind::Snapshot)
            .ok_or_else(|| Error::Invalid("send takes a snapshot".into()))?;
        let mut cands: Vec<DeviceRecord> = e
            .snapshots_of(image)?
            .into_iter()
            .filter(|s| s.seq < snap.seq)
            .filter(|s| {
                s.identity
                    .is_some_and(|i| h.snapshots.iter().any(|x| x.id == i.to_string()))
            })
            .collect();
        cands.sort_by_key(|s| s.seq);
        Ok(cands.pop())
    }

    /// `thinfs receive`: read a stream from `input`. Needs root (see
    /// [`Service::require_root`]).
    pub fn receive(
        &self,
        c: &Caller,
        req: &ReceiveRequest,
        mut input: std::fs::File,
        job: &Job,
    ) -> Result<ReceiveSummary> {
        self.require_root(c, &format!("receive {}", req.name))?;
        if req.abandon {
            let p = self.engine().abandon_receive(&Name::new(&req.name)?)?;
            return Ok(ReceiveSummary {
                snapshot: format!("{}@{}", p.name, p.snapshot),
                id: p.identity,
                created_image: false,
                rolled_back: false,
                bytes: 0,
                ranges: 0,
                abandoned: true,
            });
        }
        // A new image takes a name a request may make (no control
        // character, no leading `-`, which the start-up sweeps reserve);
        // an existing image keeps whatever name it has.
        let name = match Name::fresh(&req.name) {
            Ok(n) => n,
            Err(e) => {
                let n = Name::new(&req.name)?;
                if self.engine().image_id(&n)?.is_none() {
                    return Err(e);
                }
                n
            }
        };
        let what = format!("receiving {name}");
        let r: Received = self.engine().receive_stream_with(
            &name,
            req.force_rollback,
            req.keep_partial,
            &mut input,
            &JobProgress(job, &what),
        )?;
        Ok(ReceiveSummary {
            snapshot: format!("{}@{}", r.image.name, r.snapshot.name),
            id: r
                .snapshot
                .identity
                .map(|i| i.to_string())
                .unwrap_or_default(),
            created_image: r.created_image,
            rolled_back: r.rolled_back,
            bytes: r.bytes,
            ranges: r.ranges,
            abandoned: false,
        })
    }
}
