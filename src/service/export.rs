//! `thinfs export NAME[@SNAP]`: a plain tarball of an image's or a
//! snapshot's files, for systems that do not run thinfs.
//!
//! Rights: the export reads every file of the device as root, so it needs
//! root or the admin group, like every change. A snapshot is exported as
//! it is; an image from a consistent point: a temporary snapshot is taken
//! (`export-tmp-PID-N`, labelled `thinfs.export=temporary`), exported and
//! destroyed, whether the export ends well, fails or is cancelled; one
//! left by a daemon that died meanwhile is destroyed when the next one
//! starts ([`Service::sweep_export_leftovers`]). The device stays mounted (and cannot be
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

/// Prefix of a temporary snapshot's name.
const TEMP_PREFIX: &str = "export-tmp-";
/// Label of a temporary snapshot, for people who list it. The sweep at
/// start goes by the daemon's own mark ([`crate::engine::TEMPORARY_LABEL`]
/// = `export`), which no request can set.
const TEMP_LABEL: &str = "thinfs.export";
const TEMP_VALUE: &str = "temporary";

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
            DeviceKind::Containerd => {
                return Err(Error::Invalid(format!(
                    "{t} is a containerd layer: snapshot it (thinfs snapshot {t}@NAME) and export the snapshot"
                )));
            }
            DeviceKind::Image => {
                let n = TEMP_SERIAL.fetch_add(1, Ordering::Relaxed);
                let name = Name::new(&format!("{TEMP_PREFIX}{}-{n}", std::process::id()))?;
                let s = self.engine.snapshot_temporary(rec.id, &name, "export")?;
                _temp = TempSnapshot {
                    engine: &self.engine,
                    id: s.id,
                    name: format!("{}@{name}", rec.name),
                };
                self.engine.set_label(
                    &Target {
                        image: rec.name.clone(),
                        snap: Some(name),
                    },
                    TEMP_LABEL,
                    Some(TEMP_VALUE),
                )?;
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

    /// Destroy temporary export snapshots left by a daemon that died during
    /// an export (call before serving). Returns how many were destroyed.
    pub fn sweep_export_leftovers(&self) -> usize {
        let mut n = 0;
        let Ok(images) = self.engine.images() else {
            return 0;
        };
        for img in images {
            for s in self.engine.snapshots_of(img.id).unwrap_or_default() {
                // The daemon's own mark, which no request and no backup
                // index can set (a user may label a snapshot
                // `thinfs.export=temporary`; it stays the user's).
                let ours = s.name.as_str().starts_with(TEMP_PREFIX)
                    && crate::engine::is_temporary(&s, "export");
                if !ours {
                    continue;
                }
                match self.engine.destroy_id(s.id) {
                    Ok(()) => {
                        log::warn!(
                            "destroyed {}@{}, left by an export that did not finish",
                            img.name,
                            s.name
                        );
                        n += 1;
                    }
                    Err(e) => log::error!(
                        "cannot destroy {}@{}, left by an export: {e}",
                        img.name,
                        s.name
                    ),
                }
            }
        }
        n
    }
}
