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
            input: s.to_string(),
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

    /// Human-readable form (binary units, one decimal).
    pub fn human(self) -> String {
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Name(String);

impl Name {
    /// Validate a name.
    pub fn new(s: &str) -> Result<Name> {
        let bad = |why| Error::InvalidName {
            name: s.to_string(),
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

    /// Validate a name given as raw bytes (from FUSE).
    pub fn from_os(s: &std::ffi::OsStr) -> Result<Name> {
        match s.to_str() {
            Some(v) => Name::new(v),
            None => Err(Error::InvalidName {
                name: s.to_string_lossy().into_owned(),
                why: "not valid UTF-8",
            }),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
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
