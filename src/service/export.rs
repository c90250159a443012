//! `thinfs export NAME[@SNAP]`: a plain tarball of an image's or a
//! snapshot's files, for systems that do not run thinfs.
//!
//! Rights: the export reads every file of the device as root, so it needs
//! root or the admin group, like every change. A snapshot is exported as
//! it is; an image from a consistent point: a temporary snapshot is taken
//! (`export-tmp-PID-N`), exported and destroyed, whether the export ends
//! well, fails or is cancelled. The device stays mounted (and cannot be
//! taken offline) while it is read. The tar format is in
//! [`super::tarwalk`].

use super::tarwalk::{JobWriter, Walker};
use super::{Caller, Job, Service};
use crate::engine::{Engine, Target};
use crate::error::{Error, Result};
use crate::sys::fsio;
use crate::types::{DeviceId, DeviceKind, Name};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

/// What to export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportRequest {
    /// `NAME` or `NAME@SNAP`.
    pub target: String,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportSummary {
    /// What was asked for.
    pub target: String,
    /// Entries in the tarball.
    pub entries: u64,
    /// Bytes of file content.
    pub file_bytes: u64,
    /// Bytes of the tarball.
    pub bytes: u64,
    /// Sockets left out (tar has no form for them).
    pub skipped_sockets: u64,
}

/// A temporary snapshot, destroyed on drop.
struct TempSnapshot<'a> {
    engine: &'a Engine,
    id: DeviceId,
    name: String,
}

impl Drop for TempSnapshot<'_> {
    fn drop(&mut self) {
        // A reader of the last moment (the idle expiry, a lookup) may hold
        // the mount briefly: try a few times.
        let mut last = None;
        for i in 0..10 {
            match self.engine.destroy_id(self.id) {
                Ok(()) => {
                    log::info!("export: temporary snapshot {} destroyed", self.name);
                    return;
                }
                Err(e @ Error::Busy(_)) => {
                    last = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(100 << i.min(4)));
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = last {
            log::error!(
                "export: cannot destroy temporary snapshot {}: {e}; destroy it by hand",
                self.name
            );
        }
    }
}

static TEMP_SERIAL: AtomicU64 = AtomicU64::new(0);

impl Service {
    /// Write a tarball of `req.target` to `out`, advancing `job`; stops
    /// with [`Error::Cancelled`] when the job is cancelled, leaving no
    /// temporary snapshot.
    pub fn export(
        &self,
        c: &Caller,
        req: &ExportRequest,
        out: File,
        job: &Job,
    ) -> Result<ExportSummary> {
        let t = Target::parse(&req.target)?;
        self.require_admin(c, &format!("export {t} (reads every file)"))?;
        let rec = self.engine.resolve(&t)?;
        let what = format!("export of {t}");
        let mut w = JobWriter::new(out, job)?;
        job.check(&what)?;
        let _temp;
        let id = match rec.kind {
            DeviceKind::Snapshot => rec.id,
            DeviceKind::Image => {
                let n = TEMP_SERIAL.fetch_add(1, Ordering::Relaxed);
                let name = Name::new(&format!("export-tmp-{}-{n}", std::process::id()))?;
                let s = self.engine.snapshot(rec.id, &name)?;
                _temp = TempSnapshot {
                    engine: &self.engine,
                    id: s.id,
                    name: format!("{}@{name}", rec.name),
                };
                s.id
            }
        };
        let counts = {
            let m = self.engine.mount(id)?;
            let _open = m.open_token(c.pid)?;
            let used = fsio::statvfs(m.root())
                .map(|s| (s.f_blocks - s.f_bfree) * s.f_frsize)
                .ok();
            job.set_total(used);
            let counts = Walker::new(&mut w, job, what.clone()).write_tree(m.root())?;
            drop(_open);
            drop(m);
            counts
        };
        Ok(ExportSummary {
            target: t.to_string(),
            entries: counts.entries,
            file_bytes: counts.file_bytes,
            bytes: w.written,
            skipped_sockets: counts.skipped_sockets,
        })
    }
}
