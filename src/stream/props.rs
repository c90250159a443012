//! Property tests of the stream decoder (outside input): any mutation of a
//! valid stream (bit flips, cuts, splices, huge length and offset fields,
//! with the checksums and digests left stale or recomputed as a malicious
//! sender would) is refused with `BadStream` or decodes to ranges that keep
//! every rule; a valid stream round-trips. The allocation bound is checked
//! by the `decoder_alloc` test binary (a counting allocator).

use super::format::{PREAMBLE, REC_HEADER, T_CHECK, T_END};
use super::*;
use crate::error::Error;
use crate::meta::Identity;
use proptest::prelude::*;

/// One range of a generated stream, in blocks.
#[derive(Debug, Clone)]
enum Gen {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// A header and ranges that an encoder takes.
fn valid() -> impl Strategy<Value = (StreamHeader, Vec<Gen>)> {
    let ranges = prop::collection::vec(
        prop_oneof![
            (0u64..4, 1usize..4, any::<u8>(), any::<bool>()).prop_map(|(gap, n, b, runs)| {
                // Runs of one byte compress (LZ4 records), others do not.
                let data: Vec<u8> = (0..n * 512)
                    .map(|i| if runs { b } else { (i as u8) ^ b })
                    .collect();
                Gen::Data(gap, data)
            }),
            (0u64..4, 1u64..8).prop_map(|(gap, n)| Gen::Zero(gap, n)),
        ],
        0..6,
    );
    (any::<bool>(), "[a-z0-9]{1,12}", any::<[u8; 16]>(), ranges).prop_map(
        |(lz4, name, id, ranges)| {
            let h = StreamHeader {
                flags: if lz4 { FLAG_LZ4 } else { 0 },
                snap_name: name,
                snap_id: Identity(id),
                base_id: None,
                size: 512 * 200,
                block_size: 512,
                resume: None,
            };
            (h, ranges)
        },
    )
}

fn encode(h: &StreamHeader, ranges: &[Gen]) -> (Vec<u8>, Vec<Record>) {
    let mut e = Encoder::new(Vec::new(), h.clone()).unwrap();
    let mut at = 0u64;
    let mut want = Vec::new();
    for g in ranges {
        match g {
            Gen::Data(gap, d) => {
                at += gap * 512;
                e.data(at, d).unwrap();
                want.push(Record::Data {
                    offset: at,
                    data: d.clone(),
                });
                at += d.len() as u64;
            }
            Gen::Zero(gap, n) => {
                at += gap * 512;
                e.zero(at, n * 512).unwrap();
                want.push(Record::Zero {
                    offset: at,
                    len: n * 512,
                });
                at += n * 512;
            }
        }
    }
    (e.finish().unwrap().0, want)
}

fn decode_all(b: &[u8]) -> crate::error::Result<(StreamHeader, Vec<Record>)> {
    let mut d = Decoder::new(b)?;
    let h = d.header().clone();
    let mut v = Vec::new();
    while let Some(r) = d.next()? {
        if !matches!(r, Record::Check { .. }) {
            v.push(r);
        }
    }
    Ok((h, v))
}

/// Recompute every checksum and digest, as a sender that means harm
/// would: the records are walked as far as their lengths fit.
pub(super) fn reseal(b: &mut [u8]) {
    if b.len() < PREAMBLE {
        return;
    }
    let c = crc32c::crc32c(&b[..12]);
    b[12..16].copy_from_slice(&c.to_le_bytes());
    let mut digest = blake3::Hasher::new();
    digest.update(&b[..PREAMBLE]);
    let mut pos = PREAMBLE;
    while pos + REC_HEADER <= b.len() {
        let plen = u32::from_le_bytes(b[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let Some(end) = (pos + REC_HEADER)
            .checked_add(plen)
            .filter(|e| *e <= b.len())
        else {
            let c = crc32c::crc32c(&b[pos..pos + 28]);
            b[pos + 28..pos + 32].copy_from_slice(&c.to_le_bytes());
            return;
        };
        let kind = b[pos];
        if (kind == T_END || kind == T_CHECK) && plen == 32 {
            let d = digest.finalize();
            b[pos + REC_HEADER..end].copy_from_slice(d.as_bytes());
        }
        let c = crc32c::crc32c(&b[pos + REC_HEADER..end]);
        b[pos + 24..pos + 28].copy_from_slice(&c.to_le_bytes());
        let c = crc32c::crc32c(&b[pos..pos + 28]);
        b[pos + 28..pos + 32].copy_from_slice(&c.to_le_bytes());
        if kind != T_END {
            digest.update(&b[pos..end]);
        }
        pos = end;
    }
}

/// A change to the bytes of a valid input.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    /// Flip one bit (index taken modulo the length).
    Flip(usize, u8),
    /// Cut the input at this index.
    Truncate(usize),
    /// Copy `len` bytes from `from` and insert them at `to`.
    Splice(usize, usize, usize),
    /// Insert these bytes.
    Insert(usize, Vec<u8>),
    /// Overwrite 4 bytes with a (huge) number, little-endian.
    U32(usize, u32),
    /// Overwrite 8 bytes with a (huge) number, little-endian.
    U64(usize, u64),
}

/// Mutations, biased to the numbers that hurt: the largest, powers of
/// two, one past a bound.
pub(crate) fn mutation() -> impl Strategy<Value = Mutation> {
    let big32 = prop_oneof![
        Just(u32::MAX),
        Just(1u32 << 31),
        Just(MAX_PAYLOAD + 1),
        Just(MAX_PAYLOAD),
        any::<u32>()
    ];
    let big64 = prop_oneof![
        Just(u64::MAX),
        Just(1u64 << 63),
        Just(1u64 << 40),
        Just(u64::MAX - 511),
        any::<u64>()
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 0usize..600, any::<usize>())
            .prop_map(|(f, l, t)| Mutation::Splice(f, l, t)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), big32).prop_map(|(i, v)| Mutation::U32(i, v)),
        (any::<usize>(), big64).prop_map(|(i, v)| Mutation::U64(i, v)),
    ]
}

/// Apply `m` to `b`.
pub(crate) fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let n = b.len();
    if n == 0 {
        return;
    }
    match m {
        Mutation::Flip(i, bit) => b[i % n] ^= 1 << bit,
        Mutation::Truncate(i) => b.truncate(i % n),
        Mutation::Splice(f, l, t) => {
            let f = f % n;
            let part: Vec<u8> = b[f..(f + l).min(n)].to_vec();
            let t = t % (n + 1);
            b.splice(t..t, part);
        }
        Mutation::Insert(i, v) => {
            let i = i % (n + 1);
            b.splice(i..i, v.iter().copied());
        }
        Mutation::U32(i, v) if n >= 4 => {
            let i = i % (n - 3);
            b[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::U64(i, v) if n >= 8 => {
            let i = i % (n - 7);
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        _ => {}
    }
}

/// Ranges a decoder yields must keep the rules it checks.
fn lawful(h: &StreamHeader, v: &[Record]) {
    let bs = h.block_size as u64;
    let mut next = 0;
    for r in v {
        let (off, len) = match r {
            Record::Data { offset, data } => {
                assert!(data.len() <= MAX_PAYLOAD as usize);
                (*offset, data.len() as u64)
            }
            Record::Zero { offset, len } => (*offset, *len),
            Record::Check { .. } => continue,
        };
        assert!(off >= next && len > 0 && off % bs == 0 && len % bs == 0);
        next = off + len;
        assert!(next <= h.size);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_streams_round_trip((h, ranges) in valid()) {
        let (b, want) = encode(&h, &ranges);
        let (got_h, got) = decode_all(&b).unwrap();
        prop_assert_eq!(got_h, h);
        prop_assert_eq!(got, want);
    }

    #[test]
    fn mutated_streams_are_refused_or_lawful(
        (h, ranges) in valid(),
        ms in prop::collection::vec(mutation(), 1..4),
        seal in any::<bool>(),
    ) {
        let (good, want) = encode(&h, &ranges);
        let mut b = good.clone();
        for m in &ms {
            apply(&mut b, m);
        }
        if seal {
            reseal(&mut b);
        }
        match decode_all(&b) {
            Err(Error::BadStream(_)) => {}
            Err(e) => prop_assert!(false, "not a clean refusal: {e:?}"),
            Ok((got_h, got)) => {
                if !seal || b == good {
                    // Checksums and digests catch every change.
                    prop_assert_eq!(&got, &want);
                }
                lawful(&got_h, &got);
            }
        }
    }
}

/// Found by `mutated_streams_are_refused_or_lawful`'s kind of input,
/// kept: record headers whose lengths are the largest numbers, with right
/// checksums, are refused before anything is allocated from them.
#[test]
fn huge_lengths_with_right_checksums_are_refused() {
    let h = StreamHeader {
        flags: FLAG_LZ4,
        snap_name: "s".into(),
        snap_id: Identity([1; 16]),
        base_id: None,
        size: 1 << 20,
        block_size: 512,
        resume: None,
    };
    let (good, _) = encode(&h, &[Gen::Data(0, vec![7; 4096])]);
    // The DATA (or LZ4) record is the second: its payload_len and len.
    let second =
        PREAMBLE + REC_HEADER + (u32::from_le_bytes(good[20..24].try_into().unwrap()) as usize);
    for (at, v) in [
        (4usize, u64::from(u32::MAX)),
        (16, u64::MAX),
        (16, 1 << 40),
        (8, u64::MAX - 511),
    ] {
        let mut b = good.clone();
        if at == 4 {
            b[second + 4..second + 8].copy_from_slice(&(v as u32).to_le_bytes());
        } else {
            b[second + at..second + at + 8].copy_from_slice(&v.to_le_bytes());
        }
        reseal(&mut b);
        match decode_all(&b) {
            Err(Error::BadStream(m)) => assert!(!m.is_empty()),
            other => panic!("field at {at} = {v}: {other:?}"),
        }
    }
}
