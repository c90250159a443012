//! Rename, rollback, resize and labels.
//!
//! Rollback order: (1) record `RollingBack` with a new `pending_dev`;
//! (2) the backend clones the snapshot into `pending_dev`; (3) one
//! transaction swaps `dev` to it, marks `Ready` and queues the old device in
//! `gc`; (4) the old device is deleted. A crash before (3) is undone at the
//! next open (pending device deleted, image unchanged); after (3) it is
//! finished (old device deleted).

use super::{Engine, Target, failpoint};
use crate::error::{Error, IoContext, Result};
use crate::meta::{DeviceKind, DeviceState};
use crate::sys::tools::Tool;
use crate::types::{Bytes, Name};

/// The longest label value (containerd's own limit).
pub const MAX_LABEL_VALUE: usize = 4096;

impl Engine {
    /// Rename an image, or a snapshot within its image.
    /// The layers above are told to forget the old name (after the lock is
    /// released).
    pub fn rename(&self, target: &Target, new: &Name) -> Result<()> {
        let rec = self.resolve(target)?;
        // An image the daemon made under a name no request can give (a
        // restore) is published by this rename: its snapshots' names came
        // from outside and must be names a request could give.
        if rec.kind == DeviceKind::Image
            && rec.name.as_str().starts_with('-')
            && !new.as_str().starts_with('-')
        {
            for s in self.snapshots_of(rec.id)? {
                Name::fresh(s.name.as_str()).map_err(|e| {
                    Error::BadStream(format!("snapshot name of {}: {e}", target.image))
                })?;
            }
        }
        let before = super::DeviceEntry::from(&rec);
        {
            let lock = self.lock_of(rec.id);
            let _g = lock.lock();
            let mut rec = self.record(rec.id)?;
            if rec.name == *new {
                return Ok(());
            }
            let old = self.log_name(&rec);
            // Published under a name a request could give: no longer the
            // daemon's temporary (a restore's image, see `receive.rs`).
            if rec.name.as_str().starts_with('-') && !new.as_str().starts_with('-') {
                rec.labels.remove(super::TEMPORARY_LABEL);
            }
            rec.name = new.clone();
            self.meta.txn(|t| t.put(&rec)).map_err(|e| match e {
                Error::AlreadyExists(_) => {
                    Error::AlreadyExists(format!("{new} (renaming {target})"))
                }
                e => e,
            })?;
            log::info!("renamed {old} to {} (id {})", self.log_name(&rec), rec.id);
        }
        self.tell_holders(|h| h.invalidate(&before));
        Ok(())
    }

    /// Put image `image` back to snapshot `image@snap`. Newer snapshots of
    /// the image are refused unless `destroy_newer`. The image (and the
    /// newer snapshots) are taken offline first: EBUSY while files are open
    /// in any of them, and then nothing has changed.
    pub fn rollback(&self, target: &Target, destroy_newer: bool) -> Result<()> {
        let snap = self.resolve(target)?;
        if snap.kind != DeviceKind::Snapshot {
            return Err(Error::Invalid(format!(
                "rollback needs NAME@SNAP, got {target}"
            )));
        }
        let image = snap
            .parent
            .ok_or_else(|| Error::Corrupt(format!("snapshot {target} has no image")))?;
        let newer: Vec<_> = self
            .snapshots_of(image)?
            .into_iter()
            .filter(|s| s.seq > snap.seq)
            .collect();
        if !newer.is_empty() && !destroy_newer {
            let names: Vec<_> = newer.iter().map(|s| s.name.to_string()).collect();
            return Err(Error::Busy(format!(
                "{target} is not the newest snapshot (newer: {}); use --destroy-newer",
                names.join(", ")
            )));
        }
        let img = self.record(image)?;
        if img.kind == DeviceKind::Containerd {
            return Err(Error::PermissionDenied(format!(
                "{} is containerd's layer: it cannot be rolled back",
                img.name
            )));
        }
        let mut offline = newer.clone();
        offline.push(img);
        let what = format!("roll back {}", target.image);
        // The source snapshot's lock too: it must not go while it is cloned.
        self.with_offline_also(&offline, &[snap.id], &what, |off| {
            let still: Vec<_> = self
                .snapshots_of(image)?
                .into_iter()
                .filter(|s| s.seq > snap.seq)
                .collect();
            let (mut a, mut b): (Vec<_>, Vec<_>) = (
                still.iter().map(|s| s.id).collect(),
                newer.iter().map(|s| s.id).collect(),
            );
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                return Err(Error::Busy(format!(
                    "snapshots of {} changed meanwhile; nothing was done, try again",
                    target.image
                )));
            }
            let snap = self.ready(snap.id)?;
            for s in &newer {
                self.destroy_offline(s.id, off)?;
            }
            self.rollback_offline(image, &snap, target)
        })
    }

    fn rollback_offline(
        &self,
        image: crate::types::DeviceId,
        snap: &crate::meta::DeviceRecord,
        target: &Target,
    ) -> Result<()> {
        let mut img = self.ready(image)?;
        let tmp = {
            let _a = self.alloc.lock();
            let tmp = self.alloc_dev()?;
            img.state = DeviceState::RollingBack;
            img.pending_dev = Some(tmp);
            self.meta.txn(|t| t.put(&img))?;
            tmp
        };
        failpoint("rollback.intent");
        if let Err(e) = self.backend.snapshot(snap.dev, tmp) {
            let _ = self.backend.delete(tmp);
            img.state = DeviceState::Ready;
            img.pending_dev = None;
            self.meta.txn(|t| t.put(&img))?;
            return Err(e);
        }
        failpoint("rollback.backend");
        let old = img.dev;
        img.dev = tmp;
        img.pending_dev = None;
        img.state = DeviceState::Ready;
        img.size = snap.size;
        self.meta.txn(|t| {
            t.put(&img)?;
            t.gc_add(old)
        })?;
        failpoint("rollback.swap");
        self.collect_garbage()?;
        log::info!("rolled back image {} to {target}", img.name);
        Ok(())
    }

    /// Grow an image to `size`: online if mounted; if the kernel refuses
    /// that (EPERM without CAP_SYS_RESOURCE), offline: the image is taken
    /// offline (EBUSY while files are open in it), grown, and mounted again
    /// on next use.
    pub fn resize(&self, target: &Target, size: Bytes) -> Result<()> {
        let rec = self.resolve(target)?;
        if rec.kind != DeviceKind::Image {
            return Err(Error::Invalid(format!(
                "{target} is a snapshot; only images can be resized"
            )));
        }
        if size.0 < rec.size.0 {
            return Err(Error::InvalidSize {
                input: size.human(),
                why: "shrinking an image is not supported",
            });
        }
        if rec.size == size {
            return Ok(());
        }
        {
            let lock = self.lock_of(rec.id);
            let _g = lock.lock();
            let rec = self.ready(rec.id)?;
            if let Some(m) = self.mounted(rec.id) {
                match self.resize_online(&rec, &m, size) {
                    Err(e) if e.errno() == libc::EPERM => {
                        log::warn!("online resize of {target} refused ({e}); resizing offline");
                    }
                    other => return other,
                }
            }
        }
        self.with_offline(
            std::slice::from_ref(&rec),
            &format!("resize {target}"),
            |_| {
                let rec = self.ready(rec.id)?;
                if size.0 < rec.size.0 {
                    return Err(Error::InvalidSize {
                        input: size.human(),
                        why: "shrinking an image is not supported",
                    });
                }
                self.resize_offline(&rec, size)
            },
        )
    }

    fn record_size(&self, rec: &crate::meta::DeviceRecord, size: Bytes) -> Result<()> {
        let mut rec = rec.clone();
        rec.size = size;
        self.meta.txn(|t| t.put(&rec))?;
        log::info!("resized {} to {size}", self.log_name(&rec));
        Ok(())
    }

    fn resize_online(
        &self,
        rec: &crate::meta::DeviceRecord,
        m: &super::Mounted,
        size: Bytes,
    ) -> Result<()> {
        self.backend.resize(rec.dev, size)?;
        m.device().refresh_capacity(size)?;
        let blocks = size.0
            / crate::sys::fsio::statvfs(m.root())
                .ctx(|| "statfs".into())?
                .f_frsize;
        crate::sys::fsio::ext4_resize(m.root(), blocks)
            .ctx(|| format!("grow ext4 of {} online", rec.name))?;
        self.record_size(rec, size)
    }

    fn resize_offline(&self, rec: &crate::meta::DeviceRecord, size: Bytes) -> Result<()> {
        self.backend.resize(rec.dev, size)?;
        let active = self.backend.activate(rec.dev, size, false)?;
        let out = Tool::E2fsck
            .output(["-f".as_ref(), "-p".as_ref(), active.path().as_os_str()])
            .ctx(|| "run e2fsck".into())?;
        if !out.status.success() {
            log::warn!(
                "e2fsck before resize: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Tool::Resize2fs.run(
            &format!("grow the ext4 of {} offline", rec.name),
            [active.path()],
        )?;
        self.record_size(rec, size)
    }

    /// Check and repair the filesystem of an image or snapshot: it is taken
    /// offline (EBUSY while files are open in it), then `e2fsck -fy` for an
    /// image, `e2fsck -fn` for a snapshot (read-only); it is mounted again
    /// on next use. Returns (exit code, output). Exit 0 = clean, 1 = errors
    /// fixed; anything else is an error.
    pub fn fsck(&self, target: &Target) -> Result<(i32, String)> {
        let rec = self.resolve(target)?;
        self.with_offline(
            std::slice::from_ref(&rec),
            &format!("fsck {target}"),
            |_| {
                let rec = self.ready(rec.id)?;
                let ro = rec.kind == DeviceKind::Snapshot;
                let active = self.backend.activate(rec.dev, rec.size, ro)?;
                let mode: &std::ffi::OsStr = if ro { "-fn" } else { "-fy" }.as_ref();
                let out = Tool::E2fsck
                    .output([mode, active.path().as_os_str()])
                    .ctx(|| "run e2fsck".into())?;
                let code = out.status.code().unwrap_or(8);
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                log::info!("fsck of {target}: e2fsck exit {code}");
                if code > 1 {
                    return Err(Tool::E2fsck.failed(&format!("fsck {target}"), &out));
                }
                Ok((code, text))
            },
        )
    }

    /// Set (`Some`) or remove (`None`) a label. The key is 1-255 bytes
    /// without `=` or NUL, a value at most [`MAX_LABEL_VALUE`] bytes
    /// without NUL, whoever sets it (a request, or a restore from a backup
    /// file's index).
    pub fn set_label(&self, target: &Target, key: &str, value: Option<&str>) -> Result<()> {
        if key.is_empty() || key.len() > 255 || key.contains('=') || key.contains('\0') {
            return Err(Error::Invalid(format!(
                "bad label key {:?} (1-255 bytes, no '=' or NUL)",
                crate::types::cut(key, crate::types::MAX_SHOWN)
            )));
        }
        if key == super::TEMPORARY_LABEL {
            return Err(Error::Invalid(format!(
                "bad label key {key:?}: the daemon's own mark of its temporaries"
            )));
        }
        if let Some(v) = value
            && (v.len() > MAX_LABEL_VALUE || v.contains('\0'))
        {
            return Err(Error::Invalid(format!(
                "bad value of label {key:?}: {} bytes (at most {MAX_LABEL_VALUE}, no NUL)",
                v.len()
            )));
        }
        let rec = self.resolve(target)?;
        let lock = self.lock_of(rec.id);
        let _g = lock.lock();
        let mut rec = self.record(rec.id)?;
        match value {
            Some(v) => rec.labels.insert(key.to_string(), v.to_string()),
            None => rec.labels.remove(key),
        };
        self.meta.txn(|t| t.put(&rec))
    }
}
