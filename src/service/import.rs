//! `thinfs import NAME SOURCE`: a new image from a tar stream, ending with
//! a snapshot `NAME@import`; all or nothing.
//!
//! The daemon reads one descriptor: a tarball the CLI opened (as the
//! user), or a pipe into which the CLI writes a tar stream of a directory
//! it walks as the user (so the user's read rights apply): one code path.
//! gzip and zstd are recognised by their magic bytes (whatever the file
//! is named, stdin too) and decompressed here; xz and bzip2 are
//! recognised and refused with the command to pipe them through. The
//! unpacking is [`super::untar`]; the crash-safe creation is
//! [`crate::engine::Engine::import_image`].
//!
//! A full pool: the image's filesystem is not one the space guard
//! watches, so the import checks the pool itself every
//! [`SPACE_CHECK_EVERY`] bytes (after a sync) and stops with ENOSPC,
//! naming the pool, when less than the guard's margin would be left.
//!
//! Rights: root only. An import writes arbitrary owners, setuid files and
//! device nodes into an image that the mount shows with suid and dev
//! allowed; the admin group alone would let its members plant a
//! setuid-root program.

use super::tario::JobReader;
use super::untar::{SPACE_CHECK_EVERY, Unpacked, Unpacker};
use super::{Caller, Job, Service};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sys::fsio;
use crate::types::{Bytes, Name};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::BorrowedFd;

/// Name of the snapshot an import ends with.
pub const IMPORT_SNAPSHOT: &str = "import";

/// What to import.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRequest {
    /// New image name.
    pub name: String,
    /// Image size (`10G`); none: sized to fit.
    pub size: Option<String>,
    /// Bytes the content takes on a filesystem, as far as the client
    /// knows (a directory's walk, a tarball's length): the image is sized
    /// from it when no size is given.
    pub content_hint: Option<u64>,
}

/// What an import made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportSummary {
    /// The image.
    pub name: String,
    /// Its snapshot of what was imported (`NAME@import`).
    pub snapshot: String,
    /// Size of the image.
    pub size: u64,
    /// Entries unpacked.
    pub entries: u64,
    /// Bytes of file content.
    pub file_bytes: u64,
}

/// The size of an image for `hint` bytes of content: room for ext4's
/// metadata and journal on top, generously: a thin device costs only what
/// is written.
pub fn size_to_fit(hint: u64) -> Bytes {
    let want = hint.saturating_add(hint / 2).saturating_add(256 << 20);
    Bytes(want.div_ceil(1 << 20) << 20)
}

/// First bytes of a gzip stream.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// First bytes of a zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A decompressor whose errors name its format (a damaged frame, a cut
/// stream), keeping their kind: a cut stream stays `UnexpectedEof`.
struct Labeled<R> {
    inner: R,
    format: &'static str,
}

impl<R: Read> Read for Labeled<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(
                    e.kind(),
                    format!("the {} data ends too early (truncated)", self.format),
                )
            } else {
                std::io::Error::new(e.kind(), format!("damaged {} data: {e}", self.format))
            }
        })
    }
}

/// Whether the pool can take [`SPACE_CHECK_EVERY`] more bytes of the
/// import and still keep the space guard's margin for the other writers
/// ([`Engine::pool_has_room`], as receive does). The image's filesystem is
/// synced first, so that what it wrote so far is allocated in the pool and
/// counted.
fn pool_has_room(engine: &Engine, root: BorrowedFd<'_>, name: &Name) -> Result<()> {
    fsio::syncfs(root).map_err(|e| Error::io("sync the imported filesystem", e))?;
    engine
        .pool_has_room(&format!("import of {name}"), SPACE_CHECK_EVERY)
        .map_err(nothing_imported)
}

/// An error of an import about the pool, saying that nothing is left.
fn nothing_imported(e: Error) -> Error {
    match e {
        Error::NoSpace(m) if !m.contains("nothing was imported") => {
            Error::NoSpace(m + "; nothing was imported")
        }
        e => e,
    }
}

/// Compression of a stream, from its first bytes.
fn decompressed<'a>(mut r: BufReader<JobReader<'a>>) -> Result<Box<dyn Read + 'a>> {
    let head = r
        .fill_buf()
        .map_err(|e| Error::io("read the input", e))?
        .to_vec();
    let pipe = |tool: &str| {
        Error::Invalid(format!(
            "{tool}-compressed tarballs are not built in: pipe it, e.g. `{tool} -dc FILE | thinfs import NAME -`"
        ))
    };
    if head.starts_with(&GZIP_MAGIC) {
        Ok(Box::new(Labeled {
            inner: flate2::bufread::MultiGzDecoder::new(r),
            format: "gzip",
        }))
    } else if head.starts_with(&ZSTD_MAGIC) {
        // Every frame, one after the other (as `zstd -dc` reads them).
        let d = zstd::stream::read::Decoder::with_buffer(r)
            .map_err(|e| Error::io("start the zstd decoder", e))?;
        Ok(Box::new(Labeled {
            inner: d,
            format: "zstd",
        }))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']) {
        Err(pipe("xz"))
    } else if head.starts_with(b"BZh") {
        Err(pipe("bzip2"))
    } else if head.is_empty() {
        Err(Error::BadStream(
            "the input is empty: no tarball; nothing was imported".into(),
        ))
    } else {
        Ok(Box::new(r))
    }
}

impl Service {
    /// Import the tar stream read from `input` as image `req.name`,
    /// advancing `job`; a cancel or any error leaves nothing.
    pub fn import(
        &self,
        c: &Caller,
        req: &ImportRequest,
        input: File,
        job: &Job,
    ) -> Result<ImportSummary> {
        let name = Name::fresh(&req.name)?;
        if c.uid != 0 {
            return Err(Error::PermissionDenied(format!(
                "import of {name} needs root (uid {} asked): it writes any owner, setuid files and device nodes into an image mounted with suid and dev, so the admin group is not enough",
                c.uid
            )));
        }
        let size = match &req.size {
            Some(s) => Bytes::parse(s)?,
            None => match req.content_hint {
                Some(h) => size_to_fit(h),
                None => self.engine.config().default_image_size,
            },
        };
        let snap = Name::new(IMPORT_SNAPSHOT)?;
        let reader = JobReader::new(input, job)?;
        let mut stream = Some(decompressed(BufReader::with_capacity(1 << 20, reader))?);
        let mut counts = Unpacked::default();
        let engine = &self.engine;
        let nm = &name;
        let made = engine
            .import_image(&name, &snap, size, &mut |root| {
                let input = stream
                    .take()
                    .ok_or_else(|| Error::Invalid("the import stream was used twice".into()))?;
                counts = Unpacker::new(root, job)
                    .space_check(Box::new(move || pool_has_room(engine, root, nm)))
                    .unpack(input)?;
                Ok(())
            })
            // The pool filled up between two checks (another writer): the
            // image's writes failed with EIO.
            .map_err(|e| {
                nothing_imported(engine.full_pool_error(&format!("import of {name}"), e))
            })?;
        Ok(ImportSummary {
            name: made.image.name.to_string(),
            snapshot: format!("{}@{}", made.image.name, made.snapshot.name),
            size: made.image.size.0,
            entries: counts.entries,
            file_bytes: counts.file_bytes,
        })
    }
}

/// Write a tar stream of directory `dir` to `out` (the CLI does this as
/// the user, into the pipe it hands to the daemon): the format of
/// `thinfs export`, walked through directory descriptors.
pub fn tar_directory(
    dir: &std::path::Path,
    out: File,
    job: &Job,
) -> Result<super::tarwalk::Counts> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| Error::io(format!("open {}", dir.display()), e))?;
    let mut w = super::tarwalk::JobWriter::new(out, job)?;
    super::tarwalk::Walker::new(&mut w, job, format!("tar of {}", dir.display()))
        .write_tree(d.as_fd())
}
