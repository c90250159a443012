//! Round trips and every refusal of the decoder.

use super::*;
use crate::error::Error;
use crate::meta::Identity;

fn header(base: Option<Identity>) -> StreamHeader {
    StreamHeader {
        flags: 0,
        snap_name: "snap1".into(),
        snap_id: Identity([7; 16]),
        base_id: base,
        size: 1 << 20,
        block_size: 4096,
        resume: None,
    }
}

fn sample() -> Vec<u8> {
    let mut e = Encoder::new(Vec::new(), header(Some(Identity([3; 16])))).unwrap();
    e.data(0, &[1u8; 4096]).unwrap();
    e.zero(8192, 8192).unwrap();
    e.data(65536, &[9u8; 8192]).unwrap();
    e.finish().unwrap().0
}

fn decode_all(b: &[u8]) -> crate::error::Result<(StreamHeader, Vec<Record>)> {
    let mut d = Decoder::new(b)?;
    let h = d.header().clone();
    let mut v = Vec::new();
    while let Some(r) = d.next()? {
        v.push(r);
    }
    Ok((h, v))
}

fn refused(b: &[u8]) -> String {
    match decode_all(b) {
        Err(Error::BadStream(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn round_trip() {
    let (h, v) = decode_all(&sample()).unwrap();
    assert_eq!(h, header(Some(Identity([3; 16]))));
    assert_eq!(
        v,
        vec![
            Record::Data {
                offset: 0,
                data: vec![1; 4096]
            },
            Record::Zero {
                offset: 8192,
                len: 8192
            },
            Record::Data {
                offset: 65536,
                data: vec![9; 8192]
            },
        ]
    );
    // Large data is split into records of at most MAX_DATA.
    let mut h = header(None);
    h.size = 4 << 20;
    let mut e = Encoder::new(Vec::new(), h).unwrap();
    e.data(0, &vec![5u8; MAX_DATA + 4096]).unwrap();
    let (_, v) = decode_all(&e.finish().unwrap().0).unwrap();
    assert_eq!(v.len(), 2);
}

#[test]
fn every_cut_is_refused_as_early_eof() {
    let s = sample();
    for cut in 0..s.len() {
        let m = refused(&s[..cut]);
        assert!(m.contains("EOF before the end record"), "cut at {cut}: {m}");
    }
}

#[test]
fn every_bit_flip_is_refused() {
    let s = sample();
    for byte in 0..s.len() {
        for bit in 0..8 {
            let mut b = s.clone();
            b[byte] ^= 1 << bit;
            let m = refused(&b);
            assert!(
                m.contains("checksum")
                    || m.contains("magic")
                    || m.contains("digest")
                    || m.contains("version"),
                "flip at {byte}.{bit}: {m}"
            );
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut s = sample();
    s.push(0);
    assert!(refused(&s).contains("trailing bytes"));
}

/// Records re-framed by hand with valid checksums: only the semantic check
/// can refuse them.
fn framed(recs: &[(u8, u64, u64, Vec<u8>)], version: u32) -> Vec<u8> {
    framed_as(header(None), recs, version)
}

fn framed_as(hdr: StreamHeader, recs: &[(u8, u64, u64, Vec<u8>)], version: u32) -> Vec<u8> {
    let mut out = format::preamble().to_vec();
    out[8..12].copy_from_slice(&version.to_le_bytes());
    let c = crc32c::crc32c(&out[..12]);
    out[12..16].copy_from_slice(&c.to_le_bytes());
    let mut d = blake3::Hasher::new();
    d.update(&out);
    let mut all = vec![(format::T_BEGIN, 0, 0, hdr.encode())];
    all.extend_from_slice(recs);
    for (k, o, l, p) in all {
        let h = format::RecHeader {
            kind: k,
            payload_len: p.len() as u32,
            offset: o,
            len: l,
            payload_crc: crc32c::crc32c(&p),
        }
        .encode();
        d.update(&h);
        d.update(&p);
        out.extend_from_slice(&h);
        out.extend_from_slice(&p);
    }
    let end = d.finalize().as_bytes().to_vec();
    let h = format::RecHeader {
        kind: format::T_END,
        payload_len: 32,
        offset: 0,
        len: 0,
        payload_crc: crc32c::crc32c(&end),
    }
    .encode();
    out.extend_from_slice(&h);
    out.extend_from_slice(&end);
    out
}

#[test]
fn semantic_refusals_say_which() {
    let d = |o: u64| (format::T_DATA, o, 4096, vec![0u8; 4096]);
    assert!(decode_all(&framed(&[d(0), d(4096)], 1)).is_ok());
    // swapped records: decreasing
    assert!(refused(&framed(&[d(4096), d(0)], 1)).contains("strictly increase"));
    // overlapping
    let big = (format::T_DATA, 0, 8192, vec![0u8; 8192]);
    assert!(refused(&framed(&[big, d(4096)], 1)).contains("overlaps"));
    // unknown type
    assert!(refused(&framed(&[(9, 0, 0, vec![])], 1)).contains("unknown record type 9"));
    // wrong version
    assert!(refused(&framed(&[d(0)], 2)).contains("unsupported stream version 2"));
    // beyond the device, unaligned
    assert!(refused(&framed(&[d(1 << 20)], 1)).contains("beyond the device"));
    assert!(refused(&framed(&[(format::T_ZERO, 100, 4096, vec![])], 1)).contains("not aligned"));
    // length larger than the cap is refused before it is read
    let mut s = framed(&[d(0)], 1);
    let at = format::PREAMBLE + format::REC_HEADER + header(None).encode().len();
    let mut h = [0u8; format::REC_HEADER];
    h.copy_from_slice(&s[at..at + format::REC_HEADER]);
    h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let c = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&c.to_le_bytes());
    s[at..at + format::REC_HEADER].copy_from_slice(&h);
    assert!(refused(&s).contains("over the limit"));
    // a second header
    let hdr = (format::T_BEGIN, 0, 0, header(None).encode());
    assert!(refused(&framed(&[hdr], 1)).contains("second header"));
}

fn lz4_header() -> StreamHeader {
    StreamHeader {
        flags: FLAG_LZ4,
        size: 8 << 20,
        ..header(None)
    }
}

/// Half text-like (compresses), half pseudo-random (does not).
fn mixed() -> Vec<u8> {
    let mut v: Vec<u8> = b"thinfs compresses what repeats. "
        .iter()
        .cycle()
        .take(2 << 20)
        .copied()
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..(2 << 20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

#[test]
fn compressed_round_trip_gives_the_same_records() {
    let data = mixed();
    let stream = |flags| {
        let mut e = Encoder::new(
            Vec::new(),
            StreamHeader {
                flags,
                ..lz4_header()
            },
        )
        .unwrap();
        e.data(0, &data).unwrap();
        e.zero(4 << 20, 4096).unwrap();
        e.finish().unwrap().0
    };
    let plain = stream(0);
    let packed = stream(FLAG_LZ4);
    let (hp, vp) = decode_all(&plain).unwrap();
    let (hc, vc) = decode_all(&packed).unwrap();
    assert_eq!(hp.flags, 0);
    assert_eq!(hc.flags, FLAG_LZ4);
    assert_eq!(vp, vc, "a compressed stream decodes to the same records");
    // The repeating half shrinks to almost nothing; the random half goes
    // as plain DATA (no bigger than uncompressed).
    assert!(
        packed.len() < plain.len() / 2 + (64 << 10),
        "compressed {} vs plain {}",
        packed.len(),
        plain.len()
    );
    assert!(packed.len() > (2 << 20), "random data cannot shrink");
    // Every kind of record is there: count LZ4 and plain DATA headers.
    let kinds = record_kinds(&packed);
    assert_eq!(kinds.iter().filter(|&&k| k == format::T_LZ4).count(), 2);
    assert_eq!(kinds.iter().filter(|&&k| k == format::T_DATA).count(), 2);
}

fn record_kinds(s: &[u8]) -> Vec<u8> {
    let mut at = format::PREAMBLE;
    let mut v = Vec::new();
    while at < s.len() {
        let mut h = [0u8; format::REC_HEADER];
        h.copy_from_slice(&s[at..at + format::REC_HEADER]);
        let h = format::RecHeader::decode(&h, "test").unwrap();
        v.push(h.kind);
        at += format::REC_HEADER + h.payload_len as usize;
    }
    v
}

#[test]
fn every_bit_flip_of_a_compressed_stream_is_refused() {
    let mut e = Encoder::new(Vec::new(), lz4_header()).unwrap();
    e.data(0, &[b'a'; 16384]).unwrap();
    let s = e.finish().unwrap().0;
    assert!(record_kinds(&s).contains(&format::T_LZ4));
    for byte in 0..s.len() {
        for bit in 0..8 {
            let mut b = s.clone();
            b[byte] ^= 1 << bit;
            let m = refused(&b);
            assert!(
                m.contains("checksum") || m.contains("magic") || m.contains("digest"),
                "flip at {byte}.{bit}: {m}"
            );
        }
    }
}

#[test]
fn bad_compressed_payloads_are_refused_with_a_clear_message() {
    let good = lz4_flex::block::compress(&[7u8; 8192]);
    let lz = |o: u64, l: u64, p: Vec<u8>| (format::T_LZ4, o, l, p);
    assert!(decode_all(&framed_as(lz4_header(), &[lz(0, 8192, good.clone())], 1)).is_ok());
    // Garbage that is not an LZ4 block (checksums right: only LZ4 can tell).
    let m = refused(&framed_as(lz4_header(), &[lz(0, 8192, vec![0xff; 64])], 1));
    assert!(m.contains("compressed data is damaged"), "{m}");
    // A block that decompresses to fewer bytes than the record says.
    let m = refused(&framed_as(lz4_header(), &[lz(0, 12288, good.clone())], 1));
    assert!(m.contains("decompresses to 8192 bytes"), "{m}");
    // ... or more.
    let m = refused(&framed_as(lz4_header(), &[lz(0, 4096, good.clone())], 1));
    assert!(m.contains("compressed data is damaged"), "{m}");
    // Compressed records in a stream whose header says uncompressed.
    let m = refused(&framed(&[lz(0, 8192, good.clone())], 1));
    assert!(m.contains("does not say compressed"), "{m}");
    // A decompressed length over the cap is refused before allocating.
    let m = refused(&framed_as(
        StreamHeader {
            size: 1 << 40,
            ..lz4_header()
        },
        &[lz(0, 1 << 30, good)],
        1,
    ));
    assert!(m.contains("over the limit"), "{m}");
    // Unknown header flags.
    let m = refused(&framed_as(
        StreamHeader {
            flags: 4,
            ..lz4_header()
        },
        &[],
        1,
    ));
    assert!(m.contains("unknown flags 0x4"), "{m}");
}

/// A stream of `mib` MiB of data in 1 MiB records, from `from` on.
fn long_stream(mib: u64, resume: Option<Resume>) -> Vec<u8> {
    let from = resume.as_ref().map_or(0, |r| r.offset);
    let mut h = header(None);
    h.size = 64 << 20;
    if resume.is_some() {
        h.flags |= FLAG_RESUME;
    }
    h.resume = resume;
    let mut e = Encoder::new(Vec::new(), h).unwrap();
    for i in 0..mib {
        e.data(from + (i << 20), &vec![i as u8; 1 << 20]).unwrap();
    }
    e.finish().unwrap().0
}

#[test]
fn checkpoints_come_every_8_mib_and_are_checked() {
    let s = long_stream(20, None);
    let (_, v) = decode_all(&s).unwrap();
    let checks: Vec<u64> = v
        .iter()
        .filter_map(|r| match r {
            Record::Check { upto } => Some(*upto),
            _ => None,
        })
        .collect();
    assert_eq!(checks, vec![8 << 20, 16 << 20]);
    // The first checkpoint's digest, changed (checksums made right again):
    // refused as a digest mismatch at the checkpoint.
    let at = format::PREAMBLE
        + format::REC_HEADER
        + header(None).encode().len()
        + 8 * (format::REC_HEADER + (1 << 20));
    let mut b = s.clone();
    let hb: [u8; format::REC_HEADER] = b[at..at + format::REC_HEADER].try_into().unwrap();
    let mut h = format::RecHeader::decode(&hb, "t").unwrap();
    assert_eq!(h.kind, format::T_CHECK);
    let p = at + format::REC_HEADER;
    b[p] ^= 1;
    h.payload_crc = crc32c::crc32c(&b[p..p + 32]);
    b[at..at + format::REC_HEADER].copy_from_slice(&h.encode());
    let m = refused(&b);
    assert!(m.contains("does not match the checkpoint"), "{m}");
    // A checkpoint that claims another offset.
    let mut b = s.clone();
    h.payload_crc = crc32c::crc32c(&b[p..p + 32]);
    h.offset += 4096;
    b[at..at + format::REC_HEADER].copy_from_slice(&h.encode());
    let m = refused(&b);
    assert!(m.contains("checkpoint at"), "{m}");
}

#[test]
fn a_resuming_stream_starts_at_its_offset() {
    let r = Resume {
        offset: 16 << 20,
        token: "thinfs-resume-01ab".into(),
    };
    let s = long_stream(3, Some(r.clone()));
    let (h, v) = decode_all(&s).unwrap();
    assert_eq!(h.resume, Some(r.clone()));
    assert_eq!(v.len(), 3);
    // The encoder refuses a range below the offset ...
    let mut hd = header(None);
    hd.size = 64 << 20;
    hd.flags |= FLAG_RESUME;
    hd.resume = Some(r.clone());
    let mut e = Encoder::new(Vec::new(), hd.clone()).unwrap();
    assert!(e.data(0, &[0u8; 4096]).is_err());
    // ... and so does the decoder.
    let m = refused(&framed_as(hd, &[(format::T_ZERO, 4096, 4096, vec![])], 1));
    assert!(m.contains("precedes"), "{m}");
    // An unaligned resume offset is refused in the header.
    let mut hd = header(None);
    hd.flags |= FLAG_RESUME;
    hd.resume = Some(Resume {
        offset: 5,
        token: String::new(),
    });
    let m = refused(&framed_as(hd, &[], 1));
    assert!(m.contains("bad resume offset"), "{m}");
}
