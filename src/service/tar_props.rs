//! Property tests of the tar reader of `thinfs import` (outside input):
//! PAX records, PAX times, PAX sparse maps and whole archives unpacked
//! into a scratch directory. Any mutation of a valid input (with the tar
//! header checksums left stale or recomputed) is a clean error or an
//! unpacked tree, never a panic; valid inputs round-trip.

use super::Job;
use super::tario::{parse_pax, parse_time, pax_sparse_map};
use super::untar::Unpacker;
use crate::error::Error;
use crate::stream::props::{Mutation, apply, mutation};
use proptest::prelude::*;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// `LEN KEY=VALUE\n` with LEN counting itself.
fn pax_record(k: &[u8], v: &[u8]) -> Vec<u8> {
    let body = k.len() + v.len() + 3;
    let mut n = body + 1;
    while n != body + n.to_string().len() {
        n = body + n.to_string().len();
    }
    let mut r = n.to_string().into_bytes();
    r.push(b' ');
    r.extend_from_slice(k);
    r.push(b'=');
    r.extend_from_slice(v);
    r.push(b'\n');
    r
}

fn pax_pairs() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    prop::collection::vec(
        (
            prop::collection::vec(any::<u8>().prop_filter("no =", |b| *b != b'='), 1..20),
            prop::collection::vec(any::<u8>(), 0..40),
        ),
        0..6,
    )
}

/// A PAX sparse 1.0 map (count, offset/length pairs, padded to 512) and
/// the stored size that goes with it.
fn sparse_map() -> impl Strategy<Value = (Vec<(u64, u64)>, u64)> {
    prop::collection::vec((0u64..10_000, 0u64..5000), 0..8).prop_map(|v| {
        let mut at = 0;
        let segs: Vec<(u64, u64)> = v
            .into_iter()
            .map(|(gap, len)| {
                let s = (at + gap, len);
                at += gap + len;
                s
            })
            .collect();
        (segs, at + 7)
    })
}

fn map_text(segs: &[(u64, u64)]) -> Vec<u8> {
    let mut t = format!("{}\n", segs.len());
    for (o, l) in segs {
        t.push_str(&format!("{o}\n{l}\n"));
    }
    let mut b = t.into_bytes();
    b.resize(b.len().div_ceil(512) * 512, 0);
    b
}

/// Recompute the checksum of every block that looks like a ustar header.
fn fix_checksums(b: &mut [u8]) {
    for h in b.chunks_exact_mut(512) {
        if &h[257..262] != b"ustar" {
            continue;
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&x| u32::from(x)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
}

/// A header with every numeric field set.
fn hdr(gnu: bool, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = if gnu {
        tar::Header::new_gnu()
    } else {
        tar::Header::new_ustar()
    };
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_000_000_000);
    h
}

/// A small archive: directories, files (one with a PAX xattr and a long
/// name), a symlink and a hard link.
fn archive() -> impl Strategy<Value = (Vec<u8>, Vec<(String, Vec<u8>)>)> {
    prop::collection::vec(
        ("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..700)),
        1..4,
    )
    .prop_map(|files| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = hdr(false, tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, "d", std::io::empty()).unwrap();
        let mut want = Vec::new();
        for (i, (name, data)) in files.into_iter().enumerate() {
            let path = format!("d/{i}{name}");
            let mut h = hdr(false, tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, &path, &data[..]).unwrap();
            want.push((path, data));
        }
        b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v\n"[..])])
            .unwrap();
        let long = format!("d/{}", "l".repeat(150));
        let mut h = hdr(true, tar::EntryType::Regular, 0o600, 3);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        want.push((long, b"abc".to_vec()));
        let mut h = hdr(false, tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "d/sym", "../nowhere").unwrap();
        let mut h = hdr(false, tar::EntryType::Link, 0o644, 0);
        b.append_link(&mut h, "d/hard", &want[0].0).unwrap();
        (b.into_inner().unwrap(), want)
    })
}

/// Unpack `bytes` into a fresh scratch directory; `check` looks at it.
fn unpack(bytes: &[u8], check: impl FnOnce(&std::path::Path)) -> crate::error::Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("thinfs-tarprops-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = std::fs::File::open(&dir).unwrap();
    let job = Job::new();
    let r = Unpacker::new(root.as_fd(), &job).unpack(bytes).map(|_| ());
    if r.is_ok() {
        check(&dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn pax_records_round_trip_and_any_bytes_are_clean(
        pairs in pax_pairs(),
        junk in prop::collection::vec(any::<u8>(), 0..300),
        ms in prop::collection::vec(mutation(), 1..3),
    ) {
        let mut b: Vec<u8> = pairs.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        prop_assert_eq!(parse_pax(&b).unwrap(), pairs);
        for m in &ms {
            apply(&mut b, m);
        }
        for input in [&b, &junk] {
            if let Err(e) = parse_pax(input) {
                prop_assert!(matches!(e, Error::BadStream(_)), "{e:?}");
            }
        }
    }

    #[test]
    fn pax_times_never_panic(s in "-?[0-9]{0,20}(\\.[0-9+-]{0,12})?", t in ".{0,40}") {
        for v in [s.as_bytes(), t.as_bytes()] {
            if let Some(ts) = parse_time(v) {
                prop_assert!((0..1_000_000_000).contains(&ts.tv_nsec), "{:?}", String::from_utf8_lossy(v));
            }
        }
    }

    #[test]
    fn sparse_maps_round_trip_and_mutations_are_clean(
        (segs, size) in sparse_map(),
        ms in prop::collection::vec(mutation(), 1..3),
    ) {
        let text = map_text(&segs);
        let data: u64 = segs.iter().map(|s| s.1).sum();
        let stored = text.len() as u64 + data;
        let m = pax_sparse_map(&mut &text[..], stored, size, b"f").unwrap();
        prop_assert_eq!(&m.segments, &segs);
        let mut b = text.clone();
        for mu in &ms {
            apply(&mut b, mu);
        }
        if let Err(e) = pax_sparse_map(&mut &b[..], stored, size, b"f") {
            prop_assert!(matches!(e, Error::BadStream(_)), "{e:?}");
        }
    }
}

proptest! {
    // Each case unpacks into a directory: fewer of them.
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn archives_round_trip_and_mutations_are_clean(
        (tar, want) in archive(),
        ms in prop::collection::vec(mutation(), 1..4),
        fix in any::<bool>(),
    ) {
        unpack(&tar, |dir| {
            for (p, data) in &want {
                assert_eq!(&std::fs::read(dir.join(p)).unwrap(), data, "{p}");
            }
            assert_eq!(std::fs::read_link(dir.join("d/sym")).unwrap().to_str(), Some("../nowhere"));
        })
        .unwrap();
        let mut b = tar.clone();
        for m in &ms {
            apply(&mut b, m);
        }
        if fix {
            fix_checksums(&mut b);
        }
        let t0 = Instant::now();
        let _ = unpack(&b, |_| {});
        prop_assert!(t0.elapsed() < Duration::from_secs(10));
    }
}

/// Regressions found here, kept.
#[test]
fn tar_regressions() {
    // A PAX time of the smallest second with a fraction overflowed
    // `tv_sec - 1` (a panic in a debug build).
    assert!(parse_time(b"-9223372036854775808.5").is_none());
    // A fraction with a sign in it gave a negative tv_nsec.
    assert!(parse_time(b"1.-5").is_none());
    assert!(parse_time(b"1.+5").is_none());
    // A sparse map line without its newline was rescanned from its start
    // at every 512-byte block: 2 MiB of digits took seconds (24 MiB, the
    // bound, hours). It is refused at once now.
    let long = vec![b'1'; 2 << 20];
    let t0 = Instant::now();
    let e = pax_sparse_map(&mut &long[..], 3 << 20, 1 << 40, b"f").unwrap_err();
    assert!(matches!(e, Error::BadStream(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // Metadata entries stating 1 TiB, or just over the 16 MiB bound, are
    // refused before anything is allocated from their size (an attempt at
    // 1 TiB would abort this test binary); a long name at the bound is
    // read as far as the input goes.
    for (kind, size) in [(b'x', 1u64 << 40), (b'L', (16 << 20) + 1), (b'L', 16 << 20)] {
        let mut h = hdr(true, tar::EntryType::new(kind), 0o644, size);
        h.set_path("././@meta").unwrap();
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(&[b'9'; 4096]);
        let e = unpack(&t, |_| {}).unwrap_err();
        assert!(matches!(e, Error::BadStream(_)), "{e:?}");
    }
    // A path of 8 MiB of `a/` (a GNU long name, within its 16 MiB):
    // refused at once, not walked component by component.
    let long = "a/".repeat(4 << 20);
    let mut h = hdr(true, tar::EntryType::GNULongName, 0o644, long.len() as u64);
    h.set_path("././@LongLink").unwrap();
    h.set_cksum();
    let mut t = h.as_bytes().to_vec();
    t.extend_from_slice(long.as_bytes());
    t.resize(t.len().div_ceil(512) * 512, 0);
    let mut h = hdr(true, tar::EntryType::Directory, 0o755, 0);
    h.set_path("x").unwrap();
    h.set_cksum();
    t.extend_from_slice(h.as_bytes());
    t.extend_from_slice(&[0; 1024]);
    let t0 = Instant::now();
    let e = unpack(&t, |_| {}).unwrap_err();
    assert!(e.to_string().contains("path of"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // Every mutation kind applies to an empty input without panicking.
    let mut empty = Vec::new();
    apply(&mut empty, &Mutation::Truncate(3));
}
