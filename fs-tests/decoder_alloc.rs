//! Allocation bounds of the decoders of outside input, measured: a
//! counting global allocator notes, per thread, the largest single
//! allocation and the peak of live bytes while a decoder reads a crafted
//! input (lengths, counts and sizes at their bounds and far beyond, with
//! right checksums). No root needed. (The tar reader is not public: its
//! bounds are checked in the library's own tests, `service::tar_props`.)

use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use thinfs::stream::{Decoder, MAX_PAYLOAD, ResumeToken};

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn grew(size: usize) {
    // try_with: a thread being torn down has no locals left.
    let _ = ARMED.try_with(|a| {
        if a.get() {
            LIVE.with(|l| {
                let v = l.get() + size;
                l.set(v);
                PEAK.with(|p| p.set(p.get().max(v)));
            });
            LARGEST.with(|m| m.set(m.get().max(size)));
        }
    });
}

fn shrank(size: usize) {
    let _ = ARMED.try_with(|a| {
        if a.get() {
            LIVE.with(|l| l.set(l.get().saturating_sub(size)));
        }
    });
}

// SAFETY: every call goes to the system allocator with the caller's own
// arguments; the counters are thread-local Cells of plain integers, made
// without allocating (const initialisers, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        shrank(l.size());
        // SAFETY: `p` was allocated by System with `l` (every allocation
        // of this program goes through here).
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        shrank(l.size());
        grew(new);
        // SAFETY: as for dealloc; `new` is the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Run `f` and return (its result, peak live bytes, largest allocation)
/// of this thread meanwhile.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|m| m.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, PEAK.with(|p| p.get()), LARGEST.with(|m| m.get()))
}

const MIB: usize = 1 << 20;

// ---- streams ---------------------------------------------------------

/// A record: header with right checksums, then the payload.
fn record(kind: u8, payload_len: u32, offset: u64, len: u64, payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 32];
    h[0] = kind;
    h[4..8].copy_from_slice(&payload_len.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h[24..28].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let c = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&c.to_le_bytes());
    let mut v = h.to_vec();
    v.extend_from_slice(payload);
    v
}

/// Preamble and header record of a compressed stream of a 1 TiB device.
fn stream_start() -> Vec<u8> {
    let mut p = b"THINFS\x00S".to_vec();
    p.extend_from_slice(&1u32.to_le_bytes());
    let c = crc32c::crc32c(&p);
    p.extend_from_slice(&c.to_le_bytes());
    let mut h = Vec::new();
    h.extend_from_slice(&1u32.to_le_bytes()); // FLAG_LZ4
    h.extend_from_slice(&(1u64 << 40).to_le_bytes());
    h.extend_from_slice(&4096u32.to_le_bytes());
    h.extend_from_slice(&[7; 16]);
    h.push(0);
    h.extend_from_slice(&[0; 16]);
    h.extend_from_slice(&1u16.to_le_bytes());
    h.push(b's');
    p.extend_from_slice(&record(1, h.len() as u32, 0, 0, &h));
    p
}

fn decode(b: &[u8]) -> Result<(), thinfs::Error> {
    let mut d = Decoder::new(b)?;
    while d.next()?.is_some() {}
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// A record claiming any payload and any decompressed length (right
    /// checksums, the payload cut short or there): the decoder never
    /// allocates more than MAX_PAYLOAD at once, 2 x MAX_PAYLOAD in all.
    #[test]
    fn stream_records_allocate_within_the_payload_bound(
        kind in prop::sample::select(vec![2u8, 3, 5, 6]),
        payload_len in prop_oneof![Just(u32::MAX), Just(MAX_PAYLOAD), Just(MAX_PAYLOAD + 1), 0u32..9000],
        len in prop_oneof![Just(u64::MAX), Just(u64::from(MAX_PAYLOAD)), Just(u64::from(MAX_PAYLOAD) + 4096), Just(1u64 << 40), 0u64..9000],
        have in 0usize..9000,
    ) {
        let mut b = stream_start();
        let payload = vec![0x11u8; have.min(payload_len as usize)];
        b.extend_from_slice(&record(kind, payload_len, 0, len, &payload));
        let (r, peak, largest) = measure(|| decode(&b));
        prop_assert!(r.is_err());
        prop_assert!(largest <= MAX_PAYLOAD as usize, "largest {largest}");
        prop_assert!(peak <= 2 * MAX_PAYLOAD as usize + MIB, "peak {peak}");
    }
}

// ---- backups ---------------------------------------------------------

/// A sparse backup file of `len` bytes whose trailer claims an index of
/// `ilen` bytes.
fn sparse_backup(len: u64, ilen: u64) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let p = std::env::temp_dir().join(format!("thinfs-alloc-{}-{ilen}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let _ = std::fs::remove_file(&p);
    f.write_all_at(b"THINFS-BACKUP-1\n", 0).unwrap();
    f.set_len(len).unwrap();
    let mut t = ilen.to_le_bytes().to_vec();
    t.extend_from_slice(&[0; 32]);
    t.extend_from_slice(b"THINFS-BACKUP-END\n");
    f.write_all_at(&t, len - t.len() as u64).unwrap();
    f
}

/// The issue's file (1 TiB, a few KiB on disk, an index of almost all of
/// it) and one at the bound: refused with at most a buffer allocated.
/// (The old reader allocated the stated length: an abort at 1 TiB.)
#[test]
fn backup_index_lengths_allocate_nothing_of_their_size() {
    let tib = 1u64 << 40;
    // 1 << 30: the reader's MAX_INDEX.
    for ilen in [tib - 1000, 1 << 30, 1 << 20] {
        let mut f = sparse_backup(tib, ilen);
        let (r, peak, largest) = measure(|| thinfs::service::verify_file(&mut f, |_| {}));
        let e = r.unwrap_err();
        assert_eq!(e.errno(), libc::EBADMSG, "{e}");
        assert!(largest <= 64 << 10, "{ilen}: largest {largest}");
        assert!(peak <= 256 << 10, "{ilen}: peak {peak}");
    }
}

// ---- resume tokens, control lines ------------------------------------

#[test]
fn tokens_and_request_lines_allocate_in_proportion() {
    let long = format!("thinfs-resume-{}", "ab".repeat(32 << 10));
    let (r, peak, _) = measure(|| ResumeToken::parse(&long));
    assert!(r.is_err());
    assert!(peak <= 4096, "token: peak {peak}");
    // The longest control line (64 KiB), deep and wide: what serde_json
    // builds stays within a small multiple of the line.
    for line in [
        format!(r#"{{"v":2,"op":"list","kind":{}"#, "[".repeat(64 << 10)),
        format!(
            r#"{{"v":2,"op":"list","kind":[{}0]}}"#,
            "0,".repeat(32 << 10)
        ),
    ] {
        let (_, peak, _) = measure(|| {
            serde_json::from_str::<serde_json::Value>(&line)
                .and_then(serde_json::from_value::<thinfs::daemon::proto::Request>)
        });
        assert!(peak <= 64 * line.len(), "line: peak {peak}");
    }
}

/// The counter counts: an allocation of 1 MiB is seen.
#[test]
fn the_counter_counts() {
    let (v, peak, largest) = measure(|| vec![1u8; MIB]);
    assert!(largest >= MIB && peak >= MIB, "{peak} {largest}");
    drop(v);
}
