//! What the dm-thin backend needs from the kernel, and how its failures
//! read: whether device-mapper with the thin-pool target is usable (loading
//! the module if it can), and device-mapper errors with the kernel's errno.

use crate::error::Error;
use crate::sys::tools::Tool;
use devicemapper::DM;
use std::path::Path;

/// A device-mapper failure with the errno the kernel gave (ENOSPC, EBUSY,
/// ENXIO...), not EIO for all; the crate's long ioctl description is cut.
pub(super) fn dmerr(what: impl Into<String>, e: devicemapper::DmError) -> Error {
    use devicemapper::{DmError, ErrorEnum, errors};
    let errno = match &e {
        DmError::Core(errors::Error::Ioctl(_, _, _, err)) => **err as i32,
        DmError::Core(errors::Error::InvalidArgument(_)) | DmError::Dm(ErrorEnum::Invalid, _) => {
            libc::EINVAL
        }
        DmError::Dm(ErrorEnum::NotFound, _) => libc::ENOENT,
        _ => libc::EIO,
    };
    let detail = match &e {
        DmError::Core(errors::Error::Ioctl(op, ..)) => format!("device-mapper ioctl {op}"),
        other => crate::types::cut(&other.to_string(), 200),
    };
    Error::io(
        format!("{}: {detail}", what.into()),
        std::io::Error::from_raw_os_error(errno),
    )
}

/// Ask the kernel to load dm-thin-pool (best effort: a kernel without it,
/// or without modprobe, is reported by the caller's next check).
fn load_thin_pool_module() {
    match Tool::Modprobe.run("load dm-thin-pool", ["dm-thin-pool"]) {
        Ok(_) => log::info!("loaded the dm-thin-pool module"),
        Err(e) => log::debug!("{e}"),
    }
}

/// Is device-mapper with the thin-pool target usable here?
pub fn available() -> std::result::Result<(), String> {
    if !Path::new("/dev/mapper/control").exists() {
        load_thin_pool_module();
    }
    if !Path::new("/dev/mapper/control").exists() {
        return Err("no /dev/mapper/control (kernel without device-mapper)".into());
    }
    let dm = DM::new().map_err(|e| format!("device-mapper: {e}"))?;
    let has = |dm: &DM| {
        dm.list_versions()
            .map(|v| v.iter().any(|(n, ..)| n == "thin-pool"))
            .unwrap_or(false)
    };
    if !has(&dm) {
        load_thin_pool_module();
        if !has(&dm) {
            return Err("the dm thin-pool target is not available (module dm-thin-pool)".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devicemapper::{DmError, ErrorEnum, errors};

    #[test]
    fn dm_errors_keep_the_kernels_errno() {
        let ioctl = |e| DmError::Core(errors::Error::Ioctl(3, None, None, Box::new(e)));
        use nix::errno::Errno;
        assert_eq!(dmerr("create", ioctl(Errno::ENOSPC)).errno(), libc::ENOSPC);
        assert_eq!(dmerr("remove", ioctl(Errno::EBUSY)).errno(), libc::EBUSY);
        assert_eq!(dmerr("x", ioctl(Errno::ENXIO)).errno(), libc::ENXIO);
        assert_eq!(
            dmerr("x", DmError::Dm(ErrorEnum::NotFound, "gone".into())).errno(),
            libc::ENOENT
        );
        assert_eq!(
            dmerr("x", DmError::Dm(ErrorEnum::Error, "?".into())).errno(),
            libc::EIO
        );
        let m = dmerr("create thin 5", ioctl(Errno::ENOSPC)).to_string();
        assert!(m.starts_with("create thin 5: device-mapper ioctl 3"), "{m}");
    }
}
