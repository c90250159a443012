//! Reading a stream: every check, with a message that says which failed.

use super::format::{
    self, FLAG_LZ4, MAX_PAYLOAD, PREAMBLE, REC_HEADER, RecHeader, Record, StreamHeader, T_BEGIN,
    T_CHECK, T_DATA, T_END, T_LZ4, T_ZERO,
};
use crate::error::{Error, Result};
use std::io::Read;

/// Reads one stream from `R`. [`Decoder::new`] checks the preamble and
/// the header record; [`Decoder::next`] yields ranges and returns `None`
/// only after the end record's digest matched and nothing followed it.
pub struct Decoder<R: Read> {
    input: R,
    digest: blake3::Hasher,
    header: StreamHeader,
    next_off: u64,
    /// Bytes consumed.
    pos: u64,
    /// Records read (the header is record 0).
    index: u64,
    done: bool,
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(Error::BadStream(format!(
                    "stream ends early (EOF before the end record) in {what}"
                )));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("read the stream ({what})"), e)),
        }
    }
    Ok(())
}

impl<R: Read> Decoder<R> {
    /// Check the preamble and read the header.
    pub fn new(mut input: R) -> Result<Decoder<R>> {
        let mut p = [0u8; PREAMBLE];
        read_full(&mut input, &mut p, "the preamble")?;
        if p[..8] != format::MAGIC {
            return Err(Error::BadStream(
                "not a thinfs stream (bad magic in the preamble)".into(),
            ));
        }
        let want = u32::from_le_bytes([p[12], p[13], p[14], p[15]]);
        if crc32c::crc32c(&p[..12]) != want {
            return Err(Error::BadStream("preamble checksum mismatch".into()));
        }
        let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
        if version != format::VERSION {
            return Err(Error::BadStream(format!(
                "unsupported stream version {version} (this thinfs reads version {})",
                format::VERSION
            )));
        }
        let mut digest = blake3::Hasher::new();
        digest.update(&p);
        let mut d = Decoder {
            input,
            digest,
            header: StreamHeader {
                flags: 0,
                snap_name: String::new(),
                snap_id: crate::meta::Identity([0; 16]),
                base_id: None,
                size: 0,
                block_size: 0,
                resume: None,
            },
            next_off: 0,
            pos: PREAMBLE as u64,
            index: 0,
            done: false,
        };
        let (h, payload) = d.read_record()?;
        if h.kind != T_BEGIN {
            return Err(Error::BadStream(format!(
                "record 0 is of type {} where the header record belongs",
                h.kind
            )));
        }
        d.header = StreamHeader::decode(&payload)?;
        d.next_off = d.header.resume.as_ref().map_or(0, |r| r.offset);
        Ok(d)
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn what(&self) -> String {
        format!("record {} at byte {}", self.index, self.pos)
    }

    /// Read one record, checking its header before trusting its length,
    /// then its payload checksum. Feeds the digest except for END.
    fn read_record(&mut self) -> Result<(RecHeader, Vec<u8>)> {
        let what = self.what();
        let mut hb = [0u8; REC_HEADER];
        read_full(&mut self.input, &mut hb, &what)?;
        let h = RecHeader::decode(&hb, &what)?;
        if !matches!(h.kind, T_BEGIN | T_DATA | T_ZERO | T_END | T_LZ4 | T_CHECK) {
            return Err(Error::BadStream(format!(
                "{what}: unknown record type {}",
                h.kind
            )));
        }
        if h.payload_len > MAX_PAYLOAD {
            return Err(Error::BadStream(format!(
                "{what}: payload of {} bytes is over the limit of {MAX_PAYLOAD}",
                h.payload_len
            )));
        }
        let mut payload = vec![0u8; h.payload_len as usize];
        read_full(&mut self.input, &mut payload, &what)?;
        if crc32c::crc32c(&payload) != h.payload_crc {
            return Err(Error::BadStream(format!(
                "{what}: payload checksum mismatch"
            )));
        }
        if h.kind == T_CHECK {
            // Checked against the digest of what came before it.
            let d = self.digest.finalize();
            if payload.len() != 32 || payload != d.as_bytes() {
                return Err(Error::BadStream(format!(
                    "{what}: digest of the stream does not match the checkpoint record"
                )));
            }
        }
        if h.kind != T_END {
            self.digest.update(&hb);
            self.digest.update(&payload);
        }
        self.pos += (REC_HEADER + payload.len()) as u64;
        self.index += 1;
        Ok((h, payload))
    }

    fn check_range(&mut self, h: &RecHeader, what: &str) -> Result<()> {
        let bs = self.header.block_size as u64;
        if h.len == 0 || !h.offset.is_multiple_of(bs) || !h.len.is_multiple_of(bs) {
            return Err(Error::BadStream(format!(
                "{what}: range {}+{} is empty or not aligned to {bs}",
                h.offset, h.len
            )));
        }
        if h.offset < self.next_off {
            return Err(Error::BadStream(format!(
                "{what}: range at {} overlaps or precedes the previous one (ending at {}); ranges must strictly increase",
                h.offset, self.next_off
            )));
        }
        match h.offset.checked_add(h.len) {
            Some(end) if end <= self.header.size => {
                self.next_off = end;
                Ok(())
            }
            _ => Err(Error::BadStream(format!(
                "{what}: range {}+{} goes beyond the device size {}",
                h.offset, h.len, self.header.size
            ))),
        }
    }

    /// The next range, or `None` once the end record checked out.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Record>> {
        if self.done {
            return Ok(None);
        }
        let what = self.what();
        let (h, payload) = self.read_record()?;
        match h.kind {
            T_DATA => {
                if h.len != payload.len() as u64 {
                    return Err(Error::BadStream(format!(
                        "{what}: data length {} differs from its payload of {}",
                        h.len,
                        payload.len()
                    )));
                }
                self.check_range(&h, &what)?;
                Ok(Some(Record::Data {
                    offset: h.offset,
                    data: payload,
                }))
            }
            T_LZ4 => {
                if self.header.flags & FLAG_LZ4 == 0 {
                    return Err(Error::BadStream(format!(
                        "{what}: compressed data in a stream whose header does not say compressed"
                    )));
                }
                if h.len > MAX_PAYLOAD as u64 {
                    return Err(Error::BadStream(format!(
                        "{what}: compressed data claims {} bytes, over the limit of {MAX_PAYLOAD}",
                        h.len
                    )));
                }
                self.check_range(&h, &what)?;
                let mut data = vec![0u8; h.len as usize];
                match lz4_flex::block::decompress_into(&payload, &mut data) {
                    Ok(n) if n == data.len() => {}
                    Ok(n) => {
                        return Err(Error::BadStream(format!(
                            "{what}: compressed data decompresses to {n} bytes, the record says {}",
                            h.len
                        )));
                    }
                    Err(e) => {
                        return Err(Error::BadStream(format!(
                            "{what}: compressed data is damaged (LZ4: {e})"
                        )));
                    }
                }
                Ok(Some(Record::Data {
                    offset: h.offset,
                    data,
                }))
            }
            T_ZERO => {
                if !payload.is_empty() {
                    return Err(Error::BadStream(format!(
                        "{what}: zero record with a payload"
                    )));
                }
                self.check_range(&h, &what)?;
                Ok(Some(Record::Zero {
                    offset: h.offset,
                    len: h.len,
                }))
            }
            T_CHECK => {
                if h.len != 0 || h.offset != self.next_off {
                    return Err(Error::BadStream(format!(
                        "{what}: checkpoint at {} where the ranges end at {}",
                        h.offset, self.next_off
                    )));
                }
                Ok(Some(Record::Check { upto: h.offset }))
            }
            T_END => {
                let d = self.digest.finalize();
                if payload.len() != 32 || payload != d.as_bytes() {
                    return Err(Error::BadStream(format!(
                        "{what}: digest of the stream does not match the end record"
                    )));
                }
                let mut one = [0u8; 1];
                loop {
                    match self.input.read(&mut one) {
                        Ok(0) => break,
                        Ok(_) => {
                            return Err(Error::BadStream(
                                "trailing bytes after the end record".into(),
                            ));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io("read the stream after its end", e)),
                    }
                }
                self.done = true;
                Ok(None)
            }
            _ => Err(Error::BadStream(format!("{what}: a second header record"))),
        }
    }
}
