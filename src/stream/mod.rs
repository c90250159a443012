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

mod decode;
mod encode;
mod format;

pub use decode::Decoder;
pub use encode::Encoder;
pub use format::{MAX_DATA, MAX_PAYLOAD, Record, StreamHeader, VERSION};

#[cfg(test)]
mod tests;
