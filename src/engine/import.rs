//! Import: a new image whose filesystem a caller fills (from a tarball or
//! a directory, see `service::import`), published with a snapshot of what
//! was imported, or nothing at all.
//!
//! Order (what a crash at each step leaves):
//! 1. a hidden device (noted in the meta `receiving` tree, shown nowhere),
//!    made and formatted with ext4;
//!    -> crash: the next open moves it to `gc` and deletes it;
//! 2. its filesystem is mounted detached (reachable by no path) and the
//!    caller fills it through the root directory descriptor; synced and
//!    unmounted; any error deletes the hidden device;
//! 3. a second hidden device, a clone of the first: the image's head;
//! 4. ONE transaction publishes the image (head) and its snapshot (the
//!    filled device, read-only from then on).

use super::send::Hidden;
use super::{Engine, failpoint};
use crate::error::{Error, Result};
use crate::meta::{DeviceKind, DeviceRecord, Identity};
use crate::sys::fsio;
use crate::types::{Bytes, Name};
use std::os::fd::BorrowedFd;

/// What an import made.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The new image.
    pub image: DeviceRecord,
    /// Its snapshot of what was imported.
    pub snapshot: DeviceRecord,
}

impl Engine {
    /// Make image `name` of `size` with snapshot `snap`, after `fill` wrote
    /// its filesystem through the root directory descriptor it is given.
    /// All or nothing: on any error (of `fill` too) nothing is left.
    pub fn import_image(
        &self,
        name: &Name,
        snap: &Name,
        size: Bytes,
        fill: &mut dyn FnMut(BorrowedFd<'_>) -> Result<()>,
    ) -> Result<Imported> {
        if self.meta.image_id(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("image {name}")));
        }
        self.check_new_size(size, &format!("import image {name}"))?;
        let mut hidden = Hidden::new(self);
        let dev = hidden.make(None, size)?;
        failpoint("import.hidden");
        let identity = Identity::random().map_err(|e| Error::io("read /dev/urandom", e))?;
        let mut rec = super::create::ready_record(
            dev,
            name.clone(),
            DeviceKind::Snapshot,
            size,
            0,
            Some(identity),
        );
        self.mkfs(&rec)?;
        {
            let m = self.mount_dev(&rec, false)?;
            fill(m.root())?;
            failpoint("import.filled");
            fsio::syncfs(m.root()).map_err(|e| Error::io("sync the imported filesystem", e))?;
        }
        self.wait_unmounted(dev)?;
        let head = hidden.make(Some(dev), size)?;
        rec.name = snap.clone();
        let img = DeviceRecord {
            id: head,
            dev: head,
            name: name.clone(),
            kind: DeviceKind::Image,
            identity: None,
            ..rec.clone()
        };
        rec.parent = Some(img.id);
        {
            let _g = self.alloc.lock();
            if self.meta.image_id(name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "image {name} (made while importing; the import is undone)"
                )));
            }
            rec.seq = self.meta.pool()?.map(|p| p.transaction_id + 1).unwrap_or(0);
            let (s, i) = (rec.clone(), img.clone());
            self.meta.txn(|t| {
                t.receiving_done(dev)?;
                t.receiving_done(head)?;
                t.put(&i)?;
                t.put(&s)
            })?;
        }
        hidden.published();
        failpoint("import.done");
        log::info!("imported image {name} (id {}, {size}) with @{snap}", img.id);
        Ok(Imported {
            image: img,
            snapshot: rec,
        })
    }
}
