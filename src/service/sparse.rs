//! Sparse files of an import: which data map an entry follows (an old GNU
//! `S` entry, PAX sparse 1.0, or one segment for a plain file; the maps
//! themselves are parsed by `tario`), and the write that puts each data
//! segment at its offset and leaves what lies between as holes. It writes
//! only into a file the unpacker has made; it never opens a name.

use super::tario::{Pending, SparseMap, bad_tar, gnu_sparse_map, pax_sparse_map};
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// The map of a file entry: an old GNU sparse one (type `S`), or PAX
/// sparse 1.0 (`GNU.sparse.major=1`, its map read here from the start of
/// the data), or one segment of the whole stored size for a plain file.
/// Other PAX sparse versions are refused.
pub(super) fn entry_map<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    p: &Pending,
    path: &[u8],
) -> Result<SparseMap> {
    let stored = entry.header().entry_size().unwrap_or(0);
    if entry.header().entry_type() == tar::EntryType::GNUSparse {
        return gnu_sparse_map(entry.header(), path);
    }
    let version = (
        p.pax_value(b"GNU.sparse.major"),
        p.pax_value(b"GNU.sparse.minor"),
    );
    let old =
        p.pax_value(b"GNU.sparse.map").is_some() || p.pax_value(b"GNU.sparse.offset").is_some();
    match version {
        (None, None) if !old => Ok(SparseMap {
            segments: vec![(0, stored)],
            size: stored,
        }),
        (Some(ma), Some(mi)) if ma == b"1" && mi == b"0" => {
            let size = p
                .pax_value(b"GNU.sparse.realsize")
                .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::BadStream(format!(
                        "sparse entry /{} has no GNU.sparse.realsize; nothing was imported",
                        String::from_utf8_lossy(path)
                    ))
                })?;
            pax_sparse_map(entry, stored, size, path)
        }
        _ => Err(Error::BadStream(format!(
            "/{} is a PAX sparse entry of a version before 1.0, which this import does not read: make the tarball with `tar --format=pax --sparse` (version 1.0) or without --sparse; nothing was imported",
            String::from_utf8_lossy(path)
        ))),
    }
}

/// Write a file's data, read from `r`, at its segments' offsets in the
/// new file `f`, and give it its size: what lies between segments stays a
/// hole. `buf` is the copy buffer (grown to 1 MiB), `spend` counts each
/// chunk before it is written (the import's space check), `at` names a
/// write error of `path`. Returns the bytes written.
pub(super) fn write_data(
    r: &mut impl Read,
    f: &File,
    map: &SparseMap,
    path: &Path,
    buf: &mut Vec<u8>,
    mut spend: impl FnMut(u64) -> Result<()>,
    at: fn(&Path, &str, io::Error) -> Error,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    buf.resize(1 << 20, 0);
    let mut written = 0;
    for &(off, len) in &map.segments {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..n])
                .map_err(|e| bad_tar(&format!("read /{}", path.display()), e))?;
            spend(n as u64)?;
            f.write_all_at(&buf[..n], off + done)
                .map_err(|e| at(path, "write", e))?;
            done += n as u64;
        }
        written += len;
    }
    f.set_len(map.size)
        .map_err(|e| at(path, "set the size of", e))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_sparse_maps() {
        let mut data = b"2\n0\n5\n8192\n3\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"hellowor");
        let mut r = &data[..];
        let m = pax_sparse_map(&mut r, data.len() as u64, 10000, b"f").unwrap();
        assert_eq!(m.segments, vec![(0, 5), (8192, 3)]);
        assert_eq!(r, b"hellowor");
        // Data that does not add up, overlapping or past the end: refused.
        assert!(pax_sparse_map(&mut &data[..], 600, 10000, b"f").is_err());
        assert!(pax_sparse_map(&mut &data[..], data.len() as u64, 8000, b"f").is_err());
        let mut o = b"2\n0\n5\n3\n3\n".to_vec();
        o.resize(520, 0);
        assert!(pax_sparse_map(&mut &o[..], 520, 100, b"f").is_err());
        // A cut map.
        assert!(pax_sparse_map(&mut &b"2\n0\n"[..], 4, 100, b"f").is_err());
    }
}
