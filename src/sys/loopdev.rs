//! Loop devices, attached with `LOOP_CONFIGURE` in one ioctl.
//!
//! Devices are always attached with `LO_FLAGS_AUTOCLEAR`: the kernel detaches
//! them when the last opener (the filesystem mounted on them) goes away, so a
//! crash of the daemon never leaks a loop device.

use super::cvt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device, held open. Dropping it closes the handle; the
/// device itself goes away once nothing else (a mount) holds it.
#[derive(Debug)]
pub struct LoopDevice {
    dev: File,
    path: PathBuf,
}

impl LoopDevice {
    /// Attach `backing` (an open image file) to a free loop device with
    /// 4096-byte blocks, direct I/O and autoclear; read-only if asked.
    pub fn attach(backing: &File, read_only: bool, name: &str) -> io::Result<LoopDevice> {
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")?;
        // Another process may take the free device between GET_FREE and
        // CONFIGURE: retry a few times on EBUSY.
        let mut last = io::Error::from_raw_os_error(libc::EBUSY);
        for _ in 0..32 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
            let n = cvt(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)?;
            let mut flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
            if read_only {
                flags |= LO_FLAGS_READ_ONLY;
            }
            let mut file_name = [0u8; 64];
            let nb = name.as_bytes();
            let len = nb.len().min(63);
            file_name[..len].copy_from_slice(&nb[..len]);
            let cfg = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: 4096,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: flags,
                    lo_file_name: file_name,
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: cfg is a fully initialised struct loop_config that lives
            // across the call; the kernel only reads it.
            let r =
                unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
            match cvt(r) {
                Ok(_) => return Ok(LoopDevice { dev, path }),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Open an already attached loop device by its node.
    pub fn open_existing(path: &std::path::Path) -> io::Result<LoopDevice> {
        let dev = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(LoopDevice {
            dev,
            path: path.to_path_buf(),
        })
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Re-read the backing file's size (after a resize).
    pub fn refresh_capacity(&self) -> io::Result<()> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        cvt(unsafe { libc::ioctl(self.dev.as_raw_fd(), LOOP_SET_CAPACITY, 0) })?;
        Ok(())
    }

    /// Size of the block device in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let mut sz: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 to the pointer given.
        cvt(unsafe { libc::ioctl(self.dev.as_raw_fd(), BLKGETSIZE64, &mut sz as *mut u64) })?;
        Ok(sz)
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x80081272;

/// Loop devices currently attached whose backing file is on the filesystem
/// device `st_dev` (as reported in /sys): used by recovery to find leftovers.
pub fn backing_files() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for name in loop_names() {
        let f = format!("/sys/block/{name}/loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(f) {
            out.push((PathBuf::from(format!("/dev/{name}")), b.trim().to_string()));
        }
    }
    out
}

/// Names of the loop devices worth asking about. `/proc/partitions` lists
/// block devices of non-zero size, so it leaves out the idle loop devices a
/// machine accumulates (hundreds after a while; a scan of `/sys/block`
/// paid a failed open for each, on every containerd Mounts). Our devices
/// are never empty files. Without it, every `/sys/block/loop*`.
fn loop_names() -> Vec<String> {
    match std::fs::read_to_string("/proc/partitions") {
        Ok(s) => loops_in_partitions(&s),
        Err(_) => std::fs::read_dir("/sys/block")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("loop"))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Whole loop devices (`loopN`, not their partitions) in the text of
/// `/proc/partitions`.
fn loops_in_partitions(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|n| {
            n.strip_prefix("loop")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(String::from)
        .collect()
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// What the kernel says of one attached loop device.
#[derive(Debug, Clone)]
pub struct LoopStatus {
    /// Device node.
    pub path: PathBuf,
    /// This loop device's own device number, in the kernel's "huge" encoding.
    pub own_dev: u64,
    /// Device number (huge encoding) of the filesystem holding the backing file.
    pub backing_dev: u64,
    /// Backing file path as the kernel prints it.
    pub backing_file: String,
}

/// The kernel's `huge_encode_dev`, as used in `lo_device`.
fn huge_encode(major: u64, minor: u64) -> u64 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Every attached loop device with its backing file's device.
pub fn attached() -> Vec<LoopStatus> {
    let mut out = Vec::new();
    for (path, backing_file) in backing_files() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Ok(devno) = std::fs::read_to_string(format!("/sys/block/{name}/dev")) else {
            continue;
        };
        let mut it = devno
            .trim()
            .split(':')
            .map(|x| x.parse::<u64>().unwrap_or(0));
        let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        // SAFETY: all-zero is a valid loop_info64.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid loop_info64 the kernel fills in.
        if cvt(unsafe {
            libc::ioctl(
                f.as_raw_fd(),
                LOOP_GET_STATUS64,
                &mut info as *mut LoopInfo64,
            )
        })
        .is_err()
        {
            continue;
        }
        out.push(LoopStatus {
            path,
            own_dev: huge_encode(maj, min),
            backing_dev: info.lo_device,
            backing_file,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::loops_in_partitions;

    #[test]
    fn only_whole_loop_devices_from_proc_partitions() {
        let text = "major minor  #blocks  name\n\n 254        0  268435456 vda\n 254        1  268434432 vda1\n   7        0      16384 loop0\n   7       12    1048576 loop12\n 259        0       1024 loop12p1\n";
        assert_eq!(loops_in_partitions(text), vec!["loop0", "loop12"]);
        assert!(loops_in_partitions("").is_empty());
    }
}
