//! Wire constants, the header record and record headers.

use crate::error::{Error, Result};
use crate::meta::Identity;

/// First 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"THINFS\x00S";
/// The one version this code writes and reads.
pub const VERSION: u32 = 1;
/// Preamble length.
pub const PREAMBLE: usize = 16;
/// Record header length.
pub const REC_HEADER: usize = 32;
/// Largest DATA payload the encoder writes.
pub const MAX_DATA: usize = 1 << 20;
/// Largest payload any record may claim (checked before reading it).
pub const MAX_PAYLOAD: u32 = 4 << 20;

pub(super) const T_BEGIN: u8 = 1;
pub(super) const T_DATA: u8 = 2;
pub(super) const T_ZERO: u8 = 3;
pub(super) const T_END: u8 = 4;
pub(super) const T_LZ4: u8 = 5;
pub(super) const T_CHECK: u8 = 6;

/// Header flag: DATA records may be LZ4-compressed (type 5, `len` = the
/// bytes once decompressed, payload = an LZ4 block). Records that would
/// not shrink stay plain DATA.
pub const FLAG_LZ4: u32 = 1;
/// Header flag: the stream resumes an interrupted receive: the header
/// carries the offset it starts at and the receiver's sealed token
/// ([`Resume`]); every range lies at or above that offset.
pub const FLAG_RESUME: u32 = 2;
/// Every flag this code knows.
pub const KNOWN_FLAGS: u32 = FLAG_LZ4 | FLAG_RESUME;
/// Data bytes between two checkpoint records: the receiver syncs and
/// notes how far it got at each one (what `receive -s` can resume from).
pub const CHECK_EVERY: u64 = 8 << 20;

/// Where a resuming stream starts, and the token it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Every range of the stream lies at or above this device offset.
    pub offset: u64,
    /// The receiver's sealed token, passed through unchanged: the
    /// receiver checks its MAC (the sender cannot).
    pub token: String,
}

/// What a stream is: the snapshot it carries and the base it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Flags: [`FLAG_LZ4`] or 0; the decoder refuses any other bit.
    pub flags: u32,
    /// Snapshot name at the source.
    pub snap_name: String,
    /// Its identity.
    pub snap_id: Identity,
    /// Identity of the base snapshot of an incremental stream.
    pub base_id: Option<Identity>,
    /// Device size in bytes.
    pub size: u64,
    /// Block size: every range is aligned to it.
    pub block_size: u32,
    /// Set (with [`FLAG_RESUME`]) on a stream that resumes an interrupted
    /// receive.
    pub resume: Option<Resume>,
}

impl StreamHeader {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.snap_name.len());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.block_size.to_le_bytes());
        v.extend_from_slice(&self.snap_id.0);
        match self.base_id {
            Some(b) => {
                v.push(1);
                v.extend_from_slice(&b.0);
            }
            None => {
                v.push(0);
                v.extend_from_slice(&[0; 16]);
            }
        }
        v.extend_from_slice(&(self.snap_name.len() as u16).to_le_bytes());
        v.extend_from_slice(self.snap_name.as_bytes());
        if let Some(r) = &self.resume {
            v.extend_from_slice(&r.offset.to_le_bytes());
            v.extend_from_slice(&(r.token.len() as u16).to_le_bytes());
            v.extend_from_slice(r.token.as_bytes());
        }
        v
    }

    pub(super) fn decode(p: &[u8]) -> Result<StreamHeader> {
        let bad = |why: &str| Error::BadStream(format!("header record: {why}"));
        if p.len() < 51 {
            return Err(bad("too short"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&p[16..32]);
        let mut base = [0u8; 16];
        base.copy_from_slice(&p[33..49]);
        let nlen = u16::from_le_bytes([p[49], p[50]]) as usize;
        let flags = u32_at(0);
        let (names, rest) = match p.len().checked_sub(51 + nlen) {
            Some(_) => p[51..].split_at(nlen),
            None => return Err(bad("name length does not match the record")),
        };
        let resume = if flags & FLAG_RESUME != 0 {
            if rest.len() < 10 {
                return Err(bad("resume offset missing"));
            }
            let mut o = [0u8; 8];
            o.copy_from_slice(&rest[..8]);
            let tlen = u16::from_le_bytes([rest[8], rest[9]]) as usize;
            if rest.len() != 10 + tlen {
                return Err(bad("token length does not match the record"));
            }
            let token = std::str::from_utf8(&rest[10..])
                .map_err(|_| bad("resume token is not UTF-8"))?
                .to_string();
            Some(Resume {
                offset: u64::from_le_bytes(o),
                token,
            })
        } else if !rest.is_empty() {
            return Err(bad("name length does not match the record"));
        } else {
            None
        };
        let name = std::str::from_utf8(names)
            .map_err(|_| bad("snapshot name is not UTF-8"))?
            .to_string();
        let mut sz = [0u8; 8];
        sz.copy_from_slice(&p[4..12]);
        let h = StreamHeader {
            flags,
            size: u64::from_le_bytes(sz),
            block_size: u32_at(12),
            snap_id: Identity(id),
            base_id: match p[32] {
                0 => None,
                1 => Some(Identity(base)),
                _ => return Err(bad("bad base marker")),
            },
            snap_name: name,
            resume,
        };
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(bad(&format!("unknown flags {:#x}", h.flags)));
        }
        if !h.block_size.is_power_of_two() || !(512..=1 << 20).contains(&h.block_size) {
            return Err(bad(&format!("bad block size {}", h.block_size)));
        }
        if h.size == 0 || !h.size.is_multiple_of(h.block_size as u64) {
            return Err(bad(&format!("bad device size {}", h.size)));
        }
        if let Some(r) = &h.resume
            && (r.offset > h.size || !r.offset.is_multiple_of(h.block_size as u64))
        {
            return Err(bad(&format!("bad resume offset {}", r.offset)));
        }
        Ok(h)
    }
}

/// One range record of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// These bytes at this offset.
    Data {
        /// Device offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Zeros (a discard) over this range.
    Zero {
        /// Device offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A checkpoint: the stream's blake3 digest up to here matched, and
    /// every range below `upto` has been yielded (the decoder only yields
    /// it; the encoder writes it by itself every [`CHECK_EVERY`] bytes).
    Check {
        /// End of the last range before the checkpoint.
        upto: u64,
    },
}

/// A record header as on the wire.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecHeader {
    pub kind: u8,
    pub payload_len: u32,
    pub offset: u64,
    pub len: u64,
    pub payload_crc: u32,
}

impl RecHeader {
    pub(super) fn encode(&self) -> [u8; REC_HEADER] {
        let mut b = [0u8; REC_HEADER];
        b[0] = self.kind;
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let c = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decode a header whose checksum is right (the caller says which
    /// record it is, for messages).
    pub(super) fn decode(b: &[u8; REC_HEADER], what: &str) -> Result<RecHeader> {
        let want = u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
        if crc32c::crc32c(&b[..28]) != want {
            return Err(Error::BadStream(format!(
                "{what}: header checksum mismatch"
            )));
        }
        if b[1..4] != [0, 0, 0] {
            return Err(Error::BadStream(format!(
                "{what}: reserved bytes are not zero"
            )));
        }
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Ok(RecHeader {
            kind: b[0],
            payload_len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            offset: u64_at(8),
            len: u64_at(16),
            payload_crc: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        })
    }
}

/// The preamble bytes.
pub(super) fn preamble() -> [u8; PREAMBLE] {
    let mut b = [0u8; PREAMBLE];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let c = crc32c::crc32c(&b[..12]);
    b[12..16].copy_from_slice(&c.to_le_bytes());
    b
}
