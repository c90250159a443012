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
    let mut out = format::preamble().to_vec();
    out[8..12].copy_from_slice(&version.to_le_bytes());
    let c = crc32c::crc32c(&out[..12]);
    out[12..16].copy_from_slice(&c.to_le_bytes());
    let mut d = blake3::Hasher::new();
    d.update(&out);
    let mut all = vec![(format::T_BEGIN, 0, 0, header(None).encode())];
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
