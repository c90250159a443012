//! Resume tokens: what a partial receive kept, named by identity, sealed
//! with the receiving pool's key.
//!
//! A token says which snapshot (by identity, never by name), on which base
//! (by identity), of which device size, and how far the receiver got: every
//! range below `offset` is on its device and synced. The sender reads a
//! token without its key ([`ResumeToken::parse`]) to pick the snapshot and
//! where to start; the receiver, which made it, checks its MAC
//! ([`ResumeToken::open`]) before it trusts any field. The MAC is blake3 in
//! keyed mode over every byte before it, under the per-pool key
//! (`Meta::resume_key`).
//!
//! Text form: `thinfs-resume-1-` then the bytes in lowercase hex:
//! version (1), flags (bit 0: compressed), snapshot identity (16), base
//! marker (1) and base identity (16, zero without one), size (u64 LE),
//! offset (u64 LE), MAC (32).

use crate::error::{Error, Result};
use crate::meta::Identity;

const PREFIX: &str = "thinfs-resume-";
const TOKEN_VERSION: u8 = 1;
const BODY: usize = 1 + 1 + 16 + 1 + 16 + 8 + 8;
const LEN: usize = BODY + 32;

/// Where an interrupted receive stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeToken {
    /// The snapshot being received.
    pub snap_id: Identity,
    /// Its base (incremental streams).
    pub base_id: Option<Identity>,
    /// Device size of the stream.
    pub size: u64,
    /// Every range below this device offset is received and synced.
    pub offset: u64,
    /// The interrupted stream was compressed (resume it the same way).
    pub compressed: bool,
}

fn bad(why: &str) -> Error {
    Error::Invalid(format!("resume token refused: {why}"))
}

impl ResumeToken {
    fn body(&self) -> [u8; BODY] {
        let mut b = [0u8; BODY];
        b[0] = TOKEN_VERSION;
        b[1] = self.compressed as u8;
        b[2..18].copy_from_slice(&self.snap_id.0);
        if let Some(base) = self.base_id {
            b[18] = 1;
            b[19..35].copy_from_slice(&base.0);
        }
        b[35..43].copy_from_slice(&self.size.to_le_bytes());
        b[43..51].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// The token as text, sealed under `key`.
    pub fn seal(&self, key: &[u8; 32]) -> String {
        let body = self.body();
        let mac = blake3::keyed_hash(key, &body);
        let mut s = String::with_capacity(PREFIX.len() + 2 * LEN);
        s.push_str(PREFIX);
        for b in body.iter().chain(mac.as_bytes()) {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    fn bytes(text: &str) -> Result<[u8; LEN]> {
        let hex = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("not a thinfs resume token"))?;
        if hex.len() != 2 * LEN || !hex.is_ascii() {
            return Err(bad("wrong length"));
        }
        let mut out = [0u8; LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("not hexadecimal"))?;
        }
        Ok(out)
    }

    /// Read a token WITHOUT checking its MAC (the sender has no key): only
    /// to choose what to send. The receiver checks it with [`Self::open`].
    pub fn parse(text: &str) -> Result<ResumeToken> {
        let b = Self::bytes(text)?;
        if b[0] != TOKEN_VERSION {
            return Err(bad(&format!("unknown token version {}", b[0])));
        }
        if b[1] > 1 {
            return Err(bad("unknown flags"));
        }
        let id = |o: usize| {
            let mut x = [0u8; 16];
            x.copy_from_slice(&b[o..o + 16]);
            Identity(x)
        };
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let t = ResumeToken {
            snap_id: id(2),
            base_id: match b[18] {
                0 => None,
                1 => Some(id(19)),
                _ => return Err(bad("bad base marker")),
            },
            size: u64_at(35),
            offset: u64_at(43),
            compressed: b[1] == 1,
        };
        if t.offset > t.size {
            return Err(bad("offset beyond the device"));
        }
        Ok(t)
    }

    /// Read a token and check that `key` sealed it: a changed token, or
    /// one made by another pool, is refused.
    pub fn open(text: &str, key: &[u8; 32]) -> Result<ResumeToken> {
        let b = Self::bytes(text)?;
        let mut mac = [0u8; 32];
        mac.copy_from_slice(&b[BODY..]);
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(key, &b[..BODY]) != blake3::Hash::from(mac) {
            return Err(bad(
                "it was changed, or this pool did not make it (MAC mismatch)",
            ));
        }
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ResumeToken {
        ResumeToken {
            snap_id: Identity([0xab; 16]),
            base_id: Some(Identity([0x11; 16])),
            size: 4 << 30,
            offset: 123 << 20,
            compressed: true,
        }
    }

    #[test]
    fn sealed_tokens_open_under_their_key_only() {
        let key = [7u8; 32];
        let t = sample();
        let s = t.seal(&key);
        assert!(s.starts_with("thinfs-resume-01"), "{s}");
        assert_eq!(ResumeToken::open(&s, &key).unwrap(), t);
        assert_eq!(ResumeToken::parse(&s).unwrap(), t);
        let full = ResumeToken {
            base_id: None,
            compressed: false,
            ..t
        };
        assert_eq!(ResumeToken::open(&full.seal(&key), &key).unwrap(), full);
        // Another pool's key.
        let e = ResumeToken::open(&s, &[8u8; 32]).unwrap_err();
        assert!(e.to_string().contains("MAC mismatch"), "{e}");
    }

    #[test]
    fn every_changed_digit_is_refused() {
        let key = [42u8; 32];
        let s = sample().seal(&key);
        let hex: Vec<char> = s.chars().collect();
        for i in PREFIX.len()..hex.len() {
            let mut c = hex.clone();
            c[i] = if c[i] == '0' { '1' } else { '0' };
            let t: String = c.into_iter().collect();
            assert!(ResumeToken::open(&t, &key).is_err(), "digit {i} changed");
        }
        // A token that names another snapshot, or a further offset, with
        // the MAC left as it was: the tampering ZFS users complained of.
        let mut forged = sample();
        forged.offset += 1 << 20;
        let mut f = forged.seal(&key);
        f.replace_range(f.len() - 64.., &s[s.len() - 64..]);
        let e = ResumeToken::open(&f, &key).unwrap_err();
        assert!(e.to_string().contains("MAC mismatch"), "{e}");
        for junk in ["", "thinfs-resume-", "zfs-token", &s[..s.len() - 2]] {
            assert!(ResumeToken::open(junk, &key).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn the_pool_key_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("thinfs-token-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let k1 = {
            let m = crate::meta::Meta::open(&dir).unwrap();
            let k = m.resume_key().unwrap();
            assert_eq!(m.resume_key().unwrap(), k, "the same key on every call");
            k
        };
        let m = crate::meta::Meta::open(&dir).unwrap();
        assert_eq!(m.resume_key().unwrap(), k1, "and after a reopen");
        assert_ne!(k1, [0u8; 32]);
        let other = std::env::temp_dir().join(format!("thinfs-token-key2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&other);
        let k2 = crate::meta::Meta::open(&other)
            .unwrap()
            .resume_key()
            .unwrap();
        assert_ne!(k1, k2, "each pool has its own key");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other);
    }

    use proptest::prelude::*;

    fn token() -> impl Strategy<Value = ResumeToken> {
        (
            any::<[u8; 16]>(),
            any::<Option<[u8; 16]>>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(|(id, base, a, b, compressed)| ResumeToken {
                snap_id: Identity(id),
                base_id: base.map(Identity),
                size: a.max(b),
                offset: a.min(b),
                compressed,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any text: a token or a clean EINVAL, never a panic.
        #[test]
        fn any_text_is_a_token_or_refused(s in ".{0,200}", key in any::<[u8; 32]>()) {
            for r in [ResumeToken::parse(&s), ResumeToken::open(&s, &key)] {
                if let Err(e) = r {
                    prop_assert_eq!(e.errno(), libc::EINVAL);
                }
            }
        }

        /// Sealed tokens round-trip; any mutation of one is refused or
        /// changes nothing.
        #[test]
        fn tokens_round_trip_and_mutations_are_refused(
            t in token(),
            key in any::<[u8; 32]>(),
            ms in prop::collection::vec(crate::stream::props::mutation(), 1..3),
        ) {
            let s = t.seal(&key);
            prop_assert_eq!(ResumeToken::open(&s, &key).unwrap(), t.clone());
            let mut b = s.clone().into_bytes();
            for m in &ms {
                crate::stream::props::apply(&mut b, m);
            }
            let m = String::from_utf8_lossy(&b);
            let _ = ResumeToken::parse(&m);
            match ResumeToken::open(&m, &key) {
                Ok(got) => prop_assert_eq!(got, t),
                Err(e) => prop_assert_eq!(e.errno(), libc::EINVAL),
            }
        }
    }
}
