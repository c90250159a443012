//! Changed ranges of dm-thin devices from the pool's own metadata: a
//! metadata snapshot (`reserve_metadata_snap`), read by `thin_delta`
//! (Debian's thin-provisioning-tools), then released, always. Cost:
//! proportional to the mappings, not to the device.
//!
//! This module owns the pool's one metadata snapshot ([`MetaSnap`]: the
//! pool-wide lock, the reserve..`thin_delta`..release sequence, the
//! fallback to reading both devices when the tool is missing, and the
//! release at open of a snapshot a killed daemon left held) and the
//! parsing of `thin_delta`'s XML. It sends pool messages only through the
//! pool's hands (a closure); it never sets up or tears down a device.
//! Never used to decide
//! anything but which ranges to read: a range the tool calls `same` is
//! shared by both devices (one data block, copied on write), so its bytes
//! are equal.

use super::probe::dmerr;
use crate::backend::{ChangedRange, RangeKind, normalize};
use crate::error::{Error, Result};
use crate::sys::tools::Tool;
use crate::types::DeviceId;
use devicemapper::{DM, DevId, DmDevice, DmOptions, ThinPoolDev, ThinPoolStatus};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The pool's metadata snapshot: one at most per pool, taken only under
/// this lock.
#[derive(Default)]
pub(super) struct MetaSnap {
    /// Held from `reserve_metadata_snap` to `release_metadata_snap`.
    lock: Mutex<()>,
    /// The log has said that `thin_delta` is missing.
    said_no_delta: AtomicBool,
}

impl MetaSnap {
    /// The changed ranges of `snap` since `base` (all of its data for
    /// none): reserve a metadata snapshot with the pool message `msg`, run
    /// `thin_delta` on the metadata device `meta`, release it. Without
    /// `thin_delta`, `read_whole` (both devices read whole) answers.
    pub(super) fn changed(
        &self,
        msg: &dyn Fn(&str) -> Result<()>,
        meta: impl FnOnce() -> Result<PathBuf>,
        read_whole: impl FnOnce() -> Result<Vec<ChangedRange>>,
        base: Option<DeviceId>,
        snap: DeviceId,
        size: u64,
    ) -> Result<Vec<ChangedRange>> {
        if !available() {
            if !self.said_no_delta.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "thin_delta is not installed (Debian package thin-provisioning-tools): \
                     changed ranges on dm-thin are found by reading both devices whole"
                );
            }
            return read_whole();
        }
        let meta = meta()?;
        let _g = self.lock.lock();
        // The reserve commits the pool's metadata first, so the snapshot
        // holds every mapping made so far.
        if let Err(e) = msg("reserve_metadata_snap") {
            // Held by someone else (a tool run by hand): say so, take it.
            log::warn!("{e}; releasing the held metadata snapshot and trying again");
            msg("release_metadata_snap")?;
            msg("reserve_metadata_snap")?;
        }
        let r = thin_delta(&meta, base, snap, size);
        if let Err(e) = msg("release_metadata_snap") {
            log::error!("{e}: the next reserve releases it");
        }
        r
    }
}

/// A daemon killed between `reserve_metadata_snap` and its release leaves
/// the metadata snapshot held (it is in the metadata's superblock), and
/// every later reserve would fail with EBUSY: release it. The status says
/// whether one is held; a release with none held would fail (EINVAL).
pub(super) fn release_leftover(dm: &DM, pool: &ThinPoolDev) -> Result<()> {
    let st = pool
        .status(dm, DmOptions::default())
        .map_err(|e| dmerr("pool status", e))?;
    if let ThinPoolStatus::Working(w) = st
        && let Some(root) = w.held_metadata_root
    {
        dm.target_msg(&DevId::Name(pool.name()), None, "release_metadata_snap")
            .map_err(|e| dmerr("release the metadata snapshot left held", e))?;
        log::warn!(
            "recovery: released the pool's metadata snapshot (block {}) left held by an earlier daemon",
            *root
        );
    }
    Ok(())
}

/// One range of `thin_delta`'s answer, in data blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delta {
    /// Mapped to the same data block on both sides.
    Same,
    /// Mapped on both sides, to different blocks.
    Different,
    /// Mapped in the left (base) device only.
    LeftOnly,
    /// Mapped in the right (snapshot) device only.
    RightOnly,
}

fn bad(why: impl std::fmt::Display) -> Error {
    Error::io(
        format!("thin_delta's answer refused: {why}"),
        std::io::Error::from_raw_os_error(libc::EIO),
    )
}

/// One `<tag a="b" .../>`, `<tag ...>` or `</tag>`.
struct Tag<'a> {
    name: &'a str,
    closing: bool,
    attrs: Vec<(&'a str, &'a str)>,
}

impl<'a> Tag<'a> {
    fn parse(body: &'a str) -> Result<Tag<'a>> {
        let (closing, body) = match body.strip_prefix('/') {
            Some(b) => (true, b),
            None => (false, body),
        };
        let body = body.strip_suffix('/').unwrap_or(body).trim_end();
        let (name, mut rest) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(bad(format!("bad element name in <{body}>")));
        }
        let mut attrs = Vec::new();
        loop {
            rest = rest.trim_start();
            if rest.is_empty() {
                break;
            }
            let (key, after) = rest
                .split_once("=\"")
                .ok_or_else(|| bad(format!("bad attribute in <{body}>")))?;
            let (value, after) = after
                .split_once('"')
                .ok_or_else(|| bad(format!("unterminated attribute in <{body}>")))?;
            attrs.push((key.trim(), value));
            rest = after;
        }
        Ok(Tag {
            name,
            closing,
            attrs,
        })
    }

    fn attr(&self, key: &str) -> Result<&'a str> {
        self.attrs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| bad(format!("<{}> has no {key}", self.name)))
    }

    fn num(&self, key: &str) -> Result<u64> {
        let v = self.attr(key)?;
        v.parse()
            .map_err(|_| bad(format!("<{}> {key}={v:?} is not a number", self.name)))
    }
}

/// Parse `thin_delta`'s XML (without `--verbose`) for devices `left` and
/// `right`: the ranges in bytes with what they are. Anything else than
/// the one `<superblock>` with one `<diff>` of those devices, closed, is
/// refused: a cut answer must never read as "fewer changes".
fn parse(xml: &str, left: u64, right: u64) -> Result<Vec<(u64, u64, Delta)>> {
    let mut out = Vec::new();
    let mut block: Option<u64> = None;
    // 0: before <superblock>, 1: in it, 2: in <diff>, 3: diff closed,
    // 4: superblock closed.
    let mut depth = 0;
    let mut rest = xml;
    while let Some(i) = rest.find('<') {
        let text = rest[..i].trim();
        if !text.is_empty() {
            return Err(bad(format!(
                "unexpected text {:?}",
                crate::types::cut(text, 60)
            )));
        }
        let (body, after) = rest[i + 1..]
            .split_once('>')
            .ok_or_else(|| bad("unterminated element (cut?)"))?;
        rest = after;
        let self_closing = body.ends_with('/');
        let t = Tag::parse(body)?;
        match (t.name, t.closing, depth) {
            ("superblock", false, 0) if !self_closing => {
                let bs = t.num("data_block_size")?;
                if bs == 0 || bs % 8 != 0 {
                    return Err(bad(format!("data_block_size {bs} sectors")));
                }
                block = Some(bs * 512);
                depth = 1;
            }
            ("diff", false, 1) if !self_closing => {
                let (l, r) = (t.num("left")?, t.num("right")?);
                if (l, r) != (left, right) {
                    return Err(bad(format!(
                        "diff of devices {l} and {r}, asked {left} and {right}"
                    )));
                }
                depth = 2;
            }
            ("diff", true, 2) => depth = 3,
            ("superblock", true, 3) => depth = 4,
            (kind, false, 2) if self_closing => {
                let what = match kind {
                    "same" => Delta::Same,
                    "different" => Delta::Different,
                    "left_only" => Delta::LeftOnly,
                    "right_only" => Delta::RightOnly,
                    other => return Err(bad(format!("unknown range <{other}>"))),
                };
                let bs = block.ok_or_else(|| bad("range before the block size"))?;
                let (b, n) = (t.num("begin")?, t.num("length")?);
                let (off, len) = b
                    .checked_mul(bs)
                    .zip(n.checked_mul(bs))
                    .filter(|(o, l)| o.checked_add(*l).is_some())
                    .ok_or_else(|| bad(format!("range {b}+{n} blocks overflows")))?;
                out.push((off, len, what));
            }
            _ => {
                return Err(bad(format!(
                    "unexpected <{}{}> here",
                    if t.closing { "/" } else { "" },
                    t.name
                )));
            }
        }
    }
    if !rest.trim().is_empty() {
        return Err(bad(format!(
            "unexpected text {:?}",
            crate::types::cut(rest.trim(), 60)
        )));
    }
    if depth != 4 {
        return Err(bad("the answer ends before </diff></superblock> (cut?)"));
    }
    Ok(out)
}

/// The changed ranges from a parsed answer. With a base: `different` and
/// `right_only` are data, `left_only` reads as zeros now. Without one (the
/// device against itself): every mapped (`same`) range is data.
fn to_ranges(v: Vec<(u64, u64, Delta)>, with_base: bool, size: u64) -> Result<Vec<ChangedRange>> {
    let mut out = Vec::with_capacity(v.len());
    for (offset, len, d) in v {
        let kind = match (with_base, d) {
            (true, Delta::Same) => continue,
            (true, Delta::Different | Delta::RightOnly) | (false, Delta::Same) => RangeKind::Data,
            (true, Delta::LeftOnly) => RangeKind::Zero,
            (false, other) => {
                return Err(bad(format!("{other:?} in a device compared with itself")));
            }
        };
        out.push(ChangedRange { offset, len, kind });
    }
    Ok(normalize(out, size))
}

/// Run `thin_delta` on the pool's metadata device `meta` (a metadata
/// snapshot must be held) and parse its answer.
fn thin_delta(
    meta: &Path,
    base: Option<DeviceId>,
    snap: DeviceId,
    size: u64,
) -> Result<Vec<ChangedRange>> {
    let left = base.unwrap_or(snap).get() as u64;
    let right = snap.get() as u64;
    let (l, r) = (left.to_string(), right.to_string());
    let args = [
        "--metadata-snap".as_ref(),
        "--snap1".as_ref(),
        l.as_ref(),
        "--snap2".as_ref(),
        r.as_ref(),
        meta.as_os_str(),
    ];
    let out = Tool::ThinDelta.run(&format!("changed ranges of thin device {right}"), args)?;
    let xml = String::from_utf8(out.stdout).map_err(|_| bad("not UTF-8"))?;
    to_ranges(parse(&xml, left, right)?, base.is_some(), size)
}

/// Is `thin_delta` installed?
fn available() -> bool {
    Tool::ThinDelta.find().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeKind::*;

    const K64: u64 = 64 << 10;

    fn r(offset: u64, len: u64, kind: RangeKind) -> ChangedRange {
        ChangedRange { offset, len, kind }
    }

    fn answer(left: u64, right: u64, body: &str) -> String {
        format!(
            "<superblock uuid=\"\" time=\"1\" transaction=\"1\" data_block_size=\"128\" nr_data_blocks=\"1000\">\n  <diff left=\"{left}\" right=\"{right}\">\n{body}  </diff>\n</superblock>\n"
        )
    }

    #[test]
    fn ranges_in_bytes_merged_by_kind() {
        let xml = answer(
            1,
            2,
            r#"    <same begin="0" length="2"/>
    <different begin="2" length="1"/>
    <right_only begin="3" length="2"/>
    <same begin="5" length="1"/>
    <left_only begin="10" length="2"/>
    <right_only begin="20" length="3"/>
"#,
        );
        let v = to_ranges(parse(&xml, 1, 2).unwrap(), true, 1 << 30).unwrap();
        // Blocks of 128 sectors = 64 KiB; different + right_only merge.
        assert_eq!(
            v,
            vec![
                r(2 * K64, 3 * K64, Data),
                r(10 * K64, 2 * K64, Zero),
                r(20 * K64, 3 * K64, Data),
            ]
        );
        // Clipped to the device's size.
        let v = to_ranges(parse(&xml, 1, 2).unwrap(), true, 21 * K64).unwrap();
        assert_eq!(v.last(), Some(&r(20 * K64, K64, Data)));
    }

    #[test]
    fn a_device_against_itself_gives_its_mapped_ranges() {
        let xml = answer(
            7,
            7,
            "<same begin=\"0\" length=\"4\"/><same begin=\"20\" length=\"3\"/>\n",
        );
        let v = to_ranges(parse(&xml, 7, 7).unwrap(), false, 1 << 30).unwrap();
        assert_eq!(v, vec![r(0, 4 * K64, Data), r(20 * K64, 3 * K64, Data)]);
        // Nothing but `same` can come from one device.
        let xml = answer(7, 7, "<different begin=\"0\" length=\"1\"/>\n");
        assert!(to_ranges(parse(&xml, 7, 7).unwrap(), false, 1 << 30).is_err());
    }

    #[test]
    fn other_block_sizes_convert() {
        let xml = "<superblock data_block_size=\"2048\"><diff left=\"3\" right=\"4\"><right_only begin=\"1\" length=\"1\"/></diff></superblock>";
        let v = to_ranges(parse(xml, 3, 4).unwrap(), true, 1 << 30).unwrap();
        assert_eq!(v, vec![r(1 << 20, 1 << 20, Data)]);
    }

    #[test]
    fn bad_answers_are_refused_with_a_reason() {
        let good = answer(1, 2, "    <different begin=\"2\" length=\"1\"/>\n");
        assert!(parse(&good, 1, 2).is_ok());
        let cases: Vec<(String, &str)> = vec![
            // Cut before its end: never "fewer changes".
            (good[..good.len() - 14].to_string(), "cut"),
            (good[..good.find("</diff>").unwrap()].to_string(), "cut"),
            (good[..good.len() - 20].to_string(), "unterminated"),
            (String::new(), "cut"),
            (answer(1, 3, ""), "asked 1 and 2"),
            (
                answer(1, 2, "<moved begin=\"1\" length=\"1\"/>"),
                "unknown range",
            ),
            (
                answer(1, 2, "<same begin=\"x\" length=\"1\"/>"),
                "not a number",
            ),
            (answer(1, 2, "<same length=\"1\"/>"), "has no begin"),
            (
                answer(1, 2, "<same begin=\"1\" length=\"99999999999999999\"/>"),
                "overflows",
            ),
            (answer(1, 2, "oops"), "unexpected text"),
            (good.replace("128", "0"), "data_block_size 0"),
            (
                good.replace("data_block_size", "block_size"),
                "no data_block_size",
            ),
            (format!("{good}<superblock>"), "unexpected <superblock>"),
            (format!("{good}junk"), "unexpected text \"junk\""),
            ("Unable to find mapping tree".to_string(), "unexpected text"),
        ];
        for (xml, why) in cases {
            match parse(&xml, 1, 2) {
                Ok(v) => panic!("accepted {xml:?}: {v:?}"),
                Err(e) => {
                    let m = e.to_string();
                    assert!(m.starts_with("thin_delta's answer refused: "), "{m}");
                    assert!(m.contains(why), "{xml:?}: {m} (wanted {why:?})");
                    assert_eq!(e.errno(), libc::EIO);
                }
            }
        }
    }

    /// Against the real tool: random mappings of two devices, some shared,
    /// written with `thin_restore`, read back by `thin_delta` (without a
    /// metadata snapshot: this metadata is in a file nobody else uses) and
    /// compared with the ranges computed here.
    #[test]
    fn thin_delta_of_random_mappings_matches_the_model() {
        let tool = |p: &str| {
            Tool::ThinDelta
                .find()
                .map(|d| d.with_file_name(p))
                .filter(|p| p.is_file())
        };
        let (Some(restore), Some(td)) = (tool("thin_restore"), tool("thin_delta")) else {
            panic!(
                "thin_restore/thin_delta missing: scripts/install-deps installs thin-provisioning-tools"
            );
        };
        let dir = std::env::temp_dir().join(format!("thinfs-delta-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..6 {
            const BLOCKS: u64 = 600;
            let mut next = 0u64;
            let (mut left, mut right) = (vec![None; BLOCKS as usize], vec![None; BLOCKS as usize]);
            let mut b = 0;
            while b < BLOCKS {
                // Runs of one kind, so that ranges merge.
                let run = 1 + rnd(12);
                let what = rnd(5);
                for i in b..(b + run).min(BLOCKS) {
                    let i = i as usize;
                    match what {
                        0 => {}
                        1 => {
                            left[i] = Some(next);
                            right[i] = Some(next);
                            next += 1;
                        }
                        2 => {
                            left[i] = Some(next);
                            right[i] = Some(next + 1);
                            next += 2;
                        }
                        3 => {
                            left[i] = Some(next);
                            next += 1;
                        }
                        _ => {
                            right[i] = Some(next);
                            next += 1;
                        }
                    }
                }
                b += run;
            }
            let dev = |id: u64, m: &[Option<u64>]| {
                let maps: String = m
                    .iter()
                    .enumerate()
                    .filter_map(|(i, d)| d.map(|d| format!("<single_mapping origin_block=\"{i}\" data_block=\"{d}\" time=\"0\"/>\n")))
                    .collect();
                let n = m.iter().flatten().count();
                format!(
                    "<device dev_id=\"{id}\" mapped_blocks=\"{n}\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n{maps}</device>\n"
                )
            };
            let xml = format!(
                "<superblock uuid=\"\" time=\"0\" transaction=\"1\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"{}\">\n{}{}</superblock>\n",
                next + 16,
                dev(5, &left),
                dev(9, &right)
            );
            let (x, meta) = (dir.join("m.xml"), dir.join("meta.bin"));
            std::fs::write(&x, xml).unwrap();
            std::fs::File::create(&meta)
                .unwrap()
                .set_len(16 << 20)
                .unwrap();
            let o = std::process::Command::new(&restore)
                .arg("-i")
                .arg(&x)
                .arg("-o")
                .arg(&meta)
                .output()
                .unwrap();
            assert!(o.status.success(), "thin_restore: {o:?}");
            let delta = |l: u64, r: u64| {
                let o = std::process::Command::new(&td)
                    .args(["--snap1", &l.to_string(), "--snap2", &r.to_string()])
                    .arg(&meta)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "thin_delta: {o:?}");
                parse(&String::from_utf8(o.stdout).unwrap(), l, r).unwrap()
            };
            let size = BLOCKS * K64;
            let got = to_ranges(delta(5, 9), true, size).unwrap();
            let mut want = Vec::new();
            for i in 0..BLOCKS as usize {
                let kind = match (left[i], right[i]) {
                    (None, None) => continue,
                    (Some(a), Some(b)) if a == b => continue,
                    (_, Some(_)) => Data,
                    (Some(_), None) => Zero,
                };
                want.push(r(i as u64 * K64, K64, kind));
            }
            assert_eq!(got, normalize(want, size), "round {round}");
            // One device against itself: its mapped ranges.
            let got = to_ranges(delta(9, 9), false, size).unwrap();
            let want: Vec<_> = (0..BLOCKS as usize)
                .filter(|&i| right[i].is_some())
                .map(|i| r(i as u64 * K64, K64, Data))
                .collect();
            assert_eq!(got, normalize(want, size), "round {round}, full");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
