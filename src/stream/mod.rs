//! The send/receive stream format: records, their encoder and decoder.
//!
//! A stream carries the logical ranges of one device that differ between
//! two snapshots (or every mapped range, for a full stream). It owns only
//! the bytes on the wire: it does no I/O policy and knows no engine.
//!
//! Layout (all integers little-endian):
//! - preamble, 16 bytes: magic `THINFS\x00S`, version (u32), crc32c of
//!   the first 12 bytes (u32);
//! - records, each a 32-byte header then `payload_len` bytes: type (u8),
//!   3 zero bytes, payload_len (u32), offset (u64), len (u64), crc32c of
//!   the payload (u32), crc32c of the first 28 header bytes (u32). The
//!   header checksum is checked before its length is trusted, and the
//!   length is capped ([`MAX_PAYLOAD`]);
//! - first record BEGIN (the [`StreamHeader`]), then DATA (offset, len,
//!   payload = the bytes) and ZERO (offset, len, no payload) in strictly
//!   increasing, non-overlapping, block-aligned order within the device,
//!   then END whose payload is the blake3 digest of every byte before the
//!   END record. Nothing may follow END.
//! - CHECK records (type 6) between ranges, every [`CHECK_EVERY`] data
//!   bytes: offset = end of the last range, payload = the blake3 digest of
//!   every byte before the CHECK record (then the record itself feeds the
//!   digest like any other). The decoder checks it like END: everything up
//!   to a checkpoint is as verified as a whole stream, which is what a
//!   partial receive keeps (`receive -s`).
//! - [`FLAG_RESUME`]: the header also carries a start offset and the
//!   receiver's sealed resume token; the stream is a stream of its own
//!   (its own digest, its own checkpoints) whose ranges all lie at or
//!   above the offset.
//! - `--compress` sets [`FLAG_LZ4`] in the header; DATA records may then
//!   be LZ4 records (type 5): `len` is the decompressed length, the
//!   payload an LZ4 block. The payload checksum and the END digest cover
//!   the bytes ON THE WIRE (compressed): a stream is checked without
//!   decompressing it, and the decompressed length must equal `len`
//!   exactly or the record is refused. LZ4 (the pure-Rust `lz4_flex`)
//!   rather than zstd: no C build, and it compresses faster than a
//!   device reads here, so it never slows a send.

mod decode;
mod encode;
mod format;
mod token;

pub use decode::Decoder;
pub use encode::Encoder;
pub use format::{
    CHECK_EVERY, FLAG_LZ4, FLAG_RESUME, MAX_DATA, MAX_PAYLOAD, Record, Resume, StreamHeader,
    VERSION,
};
pub use token::ResumeToken;

#[cfg(test)]
pub(crate) mod props;
#[cfg(test)]
mod tests;
