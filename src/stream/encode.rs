//! Writing a stream: preamble, header, ranges, end with the digest.

use super::format::{
    self, CHECK_EVERY, FLAG_LZ4, RecHeader, StreamHeader, T_BEGIN, T_CHECK, T_DATA, T_END, T_LZ4,
    T_ZERO,
};
use crate::error::{Error, IoContext, Result};
use std::io::Write;

/// Writes one stream to `W`, checking the order of ranges as it goes.
pub struct Encoder<W: Write> {
    out: W,
    digest: blake3::Hasher,
    header: StreamHeader,
    /// End of the last range written.
    next: u64,
    bytes: u64,
    records: u64,
    /// Compression buffer (with [`FLAG_LZ4`]).
    packed: Option<Vec<u8>>,
    /// Data bytes since the last checkpoint.
    since_check: u64,
}

impl<W: Write> Encoder<W> {
    /// Start a stream: writes the preamble and the header record.
    pub fn new(out: W, header: StreamHeader) -> Result<Encoder<W>> {
        let next = header.resume.as_ref().map_or(0, |r| r.offset);
        let mut e = Encoder {
            out,
            digest: blake3::Hasher::new(),
            header,
            next,
            since_check: 0,
            bytes: 0,
            records: 0,
            packed: None,
        };
        if e.header.flags & FLAG_LZ4 != 0 {
            let n = lz4_flex::block::get_maximum_output_size(format::MAX_DATA);
            e.packed = Some(vec![0u8; n]);
        }
        e.put(&format::preamble())?;
        let p = e.header.encode();
        e.record(T_BEGIN, 0, 0, &p)?;
        Ok(e)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.digest.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b).ctx(|| "write the stream".into())
    }

    fn record(&mut self, kind: u8, offset: u64, len: u64, payload: &[u8]) -> Result<()> {
        let h = RecHeader {
            kind,
            payload_len: payload.len() as u32,
            offset,
            len,
            payload_crc: crc32c::crc32c(payload),
        };
        self.put(&h.encode())?;
        self.put(payload)?;
        self.records += 1;
        Ok(())
    }

    /// A checkpoint record once [`CHECK_EVERY`] data bytes went by.
    fn maybe_check(&mut self) -> Result<()> {
        if self.since_check < CHECK_EVERY {
            return Ok(());
        }
        self.since_check = 0;
        let d = *self.digest.finalize().as_bytes();
        self.record(T_CHECK, self.next, 0, &d)
    }

    fn check_range(&mut self, offset: u64, len: u64) -> Result<()> {
        let bs = self.header.block_size as u64;
        let end = offset.checked_add(len);
        if len == 0
            || offset < self.next
            || !offset.is_multiple_of(bs)
            || !len.is_multiple_of(bs)
            || end.is_none_or(|e| e > self.header.size)
        {
            return Err(Error::Invalid(format!(
                "stream encoder: range {offset}+{len} is out of order, unaligned or beyond the device"
            )));
        }
        self.next = offset + len;
        Ok(())
    }

    /// Bytes at `offset` (split into records of at most [`format::MAX_DATA`]).
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.maybe_check()?;
        self.check_range(offset, data.len() as u64)?;
        self.since_check += data.len() as u64;
        for (i, chunk) in data.chunks(format::MAX_DATA).enumerate() {
            let o = offset + (i * format::MAX_DATA) as u64;
            let n = chunk.len() as u64;
            match self.packed.take() {
                Some(mut buf) => {
                    // A chunk that does not shrink goes as it is.
                    let r = match lz4_flex::block::compress_into(chunk, &mut buf) {
                        Ok(c) if c < chunk.len() => self.record(T_LZ4, o, n, &buf[..c]),
                        _ => self.record(T_DATA, o, n, chunk),
                    };
                    self.packed = Some(buf);
                    r?;
                }
                None => self.record(T_DATA, o, n, chunk)?,
            }
        }
        Ok(())
    }

    /// Zeros over `offset..offset+len`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.maybe_check()?;
        self.check_range(offset, len)?;
        self.record(T_ZERO, offset, len, &[])
    }

    /// Write the end record; returns the writer, the stream's length and
    /// its number of records.
    pub fn finish(mut self) -> Result<(W, u64, u64)> {
        let d = *self.digest.finalize().as_bytes();
        self.record(T_END, 0, 0, &d)?;
        self.out.flush().ctx(|| "flush the stream".into())?;
        Ok((self.out, self.bytes, self.records))
    }
}
