//! Newtypes for ids, sizes and names, each validated once where it enters.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A thin device id: 24 bits, as dm-thin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(u32);

impl DeviceId {
    /// Largest id dm-thin accepts.
    pub const MAX: u32 = (1 << 24) - 1;

    /// A checked id.
    pub fn new(v: u32) -> Result<Self> {
        if v > Self::MAX {
            return Err(Error::Invalid(format!("device id {v} exceeds 24 bits")));
        }
        Ok(DeviceId(v))
    }

    /// The raw value.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Big-endian key bytes (numeric order = byte order).
    pub fn key(self) -> [u8; 4] {
        self.0.to_be_bytes()
    }

    /// Decode a key written by [`DeviceId::key`].
    pub fn from_key(k: &[u8]) -> Result<Self> {
        let b: [u8; 4] = k
            .get(..4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::Corrupt(format!("device key of {} bytes", k.len())))?;
        DeviceId::new(u32::from_be_bytes(b))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bytes(pub u64);

impl Bytes {
    /// Parse a human-readable size: `512M`, `10G`, `1T`, `32KiB`, `4096`.
    /// Suffixes are powers of 1024 (K, M, G, T, P, with optional `i`/`iB`/`B`).
    pub fn parse(s: &str) -> Result<Bytes> {
        let bad = |why| Error::InvalidSize {
            input: cut(s, MAX_SHOWN),
            why,
        };
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        if digits_end == 0 {
            return Err(bad("must start with a number"));
        }
        let n: u64 = t[..digits_end]
            .parse()
            .map_err(|_| bad("number too large"))?;
        let suffix = t[digits_end..].trim().to_ascii_lowercase();
        let shift = match suffix.as_str() {
            "" | "b" => 0,
            "k" | "kb" | "ki" | "kib" => 10,
            "m" | "mb" | "mi" | "mib" => 20,
            "g" | "gb" | "gi" | "gib" => 30,
            "t" | "tb" | "ti" | "tib" => 40,
            "p" | "pb" | "pi" | "pib" => 50,
            _ => return Err(bad("unknown unit (use K, M, G, T, P)")),
        };
        n.checked_mul(1u64 << shift)
            .map(Bytes)
            .ok_or_else(|| bad("size overflows 64 bits"))
    }

    /// Exact form: the largest unit that divides the value (`16M`, `1536M`,
    /// `4096K`), else plain bytes (`16777217`). [`Bytes::parse`] reads it
    /// back to the same value. For messages about a size the user gave.
    pub fn human(self) -> String {
        let units = ["", "K", "M", "G", "T", "P"];
        if self.0 == 0 {
            return "0".into();
        }
        let mut i = units.len() - 1;
        while i > 0 && !self.0.is_multiple_of(1u64 << (10 * i)) {
            i -= 1;
        }
        format!("{}{}", self.0 >> (10 * i), units[i])
    }

    /// Rounded form (binary units, one decimal: `4.3M`), for tables of
    /// usage where the exact byte count does not matter.
    pub fn approx(self) -> String {
        let units = ["B", "K", "M", "G", "T", "P"];
        let mut v = self.0 as f64;
        let mut i = 0;
        while v >= 1024.0 && i + 1 < units.len() {
            v /= 1024.0;
            i += 1;
        }
        if i == 0 {
            format!("{}B", self.0)
        } else {
            format!("{v:.1}{}", units[i])
        }
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.human())
    }
}

/// A validated image or snapshot name (SPEC: 1-255 bytes, no `/` or NUL,
/// not `.`/`..`, not starting with `.`).
///
/// Two levels: [`Name::new`] checks what any name in the pool satisfies
/// (used to *refer* to a device, so that a device made by an older version
/// with an odd name can still be renamed or destroyed); [`Name::fresh`] and
/// [`Name::from_os`] also refuse control characters and a leading `-`
/// (used for every *new* name, also those made through the mount).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Name(String);

/// Longest part of a rejected input kept in an error or a log line.
pub const MAX_SHOWN: usize = 80;

/// `s` cut to at most `max` bytes (on a char boundary), saying how long it
/// was when cut: a 64 KiB name is not worth printing.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// Should `c` be shown escaped? Control characters (C0, DEL, C1), and the
/// invisible format characters that reorder or hide text (bidi overrides,
/// zero-width, BOM).
fn unusual(c: char) -> bool {
    c.is_control()
        || matches!(c, '\\' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// `s` safe to print on a terminal or in a line-based listing: control
/// and invisible characters become `\n`, `\t`, `\xNN` or `\u{NNNN}`, a
/// backslash `\\`, and a space at either end `\x20` (so that a name of
/// one space is visible). Ordinary names come back unchanged.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    let edge = |i: usize, c: char| c == ' ' && (i == 0 || i + 1 == s.len());
    if !s.char_indices().any(|(i, c)| unusual(c) || edge(i, c)) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for (i, c) in s.char_indices() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (unusual(c) || edge(i, c)) && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if unusual(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

impl Name {
    /// Validate a name that refers to a device (see the type's doc).
    pub fn new(s: &str) -> Result<Name> {
        let bad = |why| Error::InvalidName {
            name: cut(s, MAX_SHOWN),
            why,
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > 255 {
            return Err(bad("longer than 255 bytes"));
        }
        if s.contains('/') {
            return Err(bad("contains '/'"));
        }
        if s.contains('\0') {
            return Err(bad("contains NUL"));
        }
        if s.contains('@') {
            return Err(bad("contains '@' (reserved for NAME@SNAP)"));
        }
        if s.starts_with('.') {
            return Err(bad("starts with '.' (reserved)"));
        }
        Ok(Name(s.to_string()))
    }

    /// Validate a new name: also no control character (below 0x20, or
    /// 0x7f) and no leading `-`, so that a name cannot forge lines or
    /// terminal escapes in listings, nor read as an option on a command line.
    pub fn fresh(s: &str) -> Result<Name> {
        let n = Name::new(s)?;
        let bad = |why| Error::InvalidName {
            name: cut(s, MAX_SHOWN),
            why,
        };
        // Below 0x20 and 0x7f, and the C1 controls (U+0080-U+009F: U+009B
        // is CSI to an 8-bit terminal).
        if s.chars().any(char::is_control) {
            return Err(bad("contains a control character (below 0x20, or 0x7f)"));
        }
        if s.starts_with('-') {
            return Err(bad("starts with '-' (would read as an option)"));
        }
        Ok(n)
    }

    /// Validate a name looked up through FUSE, as [`Name::new`]: a device
    /// an older version named oddly stays reachable.
    pub fn lookup_os(s: &std::ffi::OsStr) -> Result<Name> {
        match s.to_str() {
            Some(v) => Name::new(v),
            None => Err(Error::InvalidName {
                name: cut(&s.to_string_lossy(), MAX_SHOWN),
                why: "not valid UTF-8",
            }),
        }
    }

    /// Validate a new name given as raw bytes (from FUSE), as [`Name::fresh`].
    pub fn from_os(s: &std::ffi::OsStr) -> Result<Name> {
        match s.to_str() {
            Some(v) => Name::fresh(v),
            None => Err(Error::InvalidName {
                name: cut(&s.to_string_lossy(), MAX_SHOWN),
                why: "not valid UTF-8",
            }),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, escaped for printing (see [`escape`]).
    pub fn escaped(&self) -> std::borrow::Cow<'_, str> {
        escape(&self.0)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(Bytes::parse("512M").unwrap().0, 512 << 20);
        assert_eq!(Bytes::parse("10G").unwrap().0, 10 << 30);
        assert_eq!(Bytes::parse("1T").unwrap().0, 1 << 40);
        assert_eq!(Bytes::parse("32KiB").unwrap().0, 32 << 10);
        assert_eq!(Bytes::parse("4096").unwrap().0, 4096);
        assert!(matches!(
            Bytes::parse("abc"),
            Err(Error::InvalidSize { .. })
        ));
        assert!(matches!(
            Bytes::parse("10X"),
            Err(Error::InvalidSize { .. })
        ));
        assert!(matches!(
            Bytes::parse("99999999999P"),
            Err(Error::InvalidSize { .. })
        ));
    }

    #[test]
    fn names_validate() {
        assert!(Name::new("base").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a\0b", "a@b"] {
            assert!(
                matches!(Name::new(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(Name::new(&"x".repeat(256)).is_err());
        assert!(Name::new(&"x".repeat(255)).is_ok());
        for bad in [
            "a\nb",
            "\x1b[31mred",
            "-rf",
            "tab\t",
            "del\x7f",
            "c1\u{9b}2J",
        ] {
            assert!(Name::new(bad).is_ok(), "{bad:?} still refers to a device");
            assert!(
                matches!(Name::fresh(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(Name::fresh("a-b c").is_ok());
        let long = "y".repeat(65536);
        let e = Name::new(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("(65536 bytes)"), "{e}");
    }

    #[test]
    fn names_escape() {
        assert_eq!(escape("base"), "base");
        assert_eq!(escape("é ü"), "é ü");
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("\x1b[2J"), "\\x1b[2J");
        assert_eq!(escape(" "), "\\x20");
        assert_eq!(escape(" a b "), "\\x20a b\\x20");
        assert_eq!(escape("a\\b"), "a\\\\b");
        assert_eq!(escape("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(escape("\u{85}"), "\\u{0085}");
    }

    #[test]
    fn sizes_print_exactly() {
        assert_eq!(Bytes(16 << 20).human(), "16M");
        assert_eq!(Bytes(16777217).human(), "16777217");
        assert_eq!(Bytes(1536 << 20).human(), "1536M");
        assert_eq!(Bytes(0).human(), "0");
        assert_eq!(Bytes((16 << 20) + 4096).human(), "16388K");
        for v in [1u64, 4095, 16777217, 1 << 40, 3 << 30] {
            assert_eq!(Bytes::parse(&Bytes(v).human()).unwrap().0, v);
        }
        assert_eq!(Bytes(16777217).approx(), "16.0M");
    }

    #[test]
    fn device_id_is_24_bits() {
        assert!(DeviceId::new(DeviceId::MAX).is_ok());
        assert!(DeviceId::new(DeviceId::MAX + 1).is_err());
        let id = DeviceId::new(258).unwrap();
        assert_eq!(DeviceId::from_key(&id.key()).unwrap(), id);
    }
}

/// What a device is to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Writable, top-level directory (clones too).
    Image,
    /// Read-only child of an image.
    Snapshot,
    /// A snapshot of containerd's (front end `containerd/`): kept apart
    /// from users' images, never in the mount's root, changed only through
    /// the snapshotter socket. Its record carries a [`ContainerdInfo`].
    Containerd,
}

/// What containerd calls a snapshot's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerdKind {
    /// Writable (Prepare), attached until Commit or Remove.
    Active,
    /// Read-only (View), attached until Remove.
    View,
    /// Read-only parent of other snapshots; never attached.
    Committed,
}

/// containerd's view of one of its snapshots, kept in the device record
/// (its keys are long and hold `/` and `:`, so they are not thinfs names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerdInfo {
    /// containerd's key (active, view) or name (committed), with its
    /// namespace prefix (`default/3/extract-...`).
    pub key: String,
    /// Active, view or committed.
    pub kind: ContainerdKind,
    /// Last change (Commit, Update), seconds since the epoch.
    #[serde(default)]
    pub updated: u64,
}

/// Persistent state of a device (containerd devmapper style). Runtime
/// states (attached, mounted) are not stored: mounts are detached and die
/// with the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Intent recorded; the backend device may be partly made.
    Creating,
    /// Complete and usable.
    Ready,
    /// A rollback is in progress: `pending_dev` holds the new content.
    RollingBack,
    /// Broken; `error` says why. Shown, never used.
    Faulty,
}
