//! The hash chain that makes a job's log tamper-evident, and the keyed
//! authentication of its heads.
//!
//! Each event's digest commits to its own stored bytes and to the digest of
//! the job's previous event, so changing, removing, inserting or reordering
//! any event changes every digest after it. The encoding is specified in
//! ARCHITECTURE.md ("The hash chain") precisely enough to re-implement:
//!
//! ```text
//! leaf   = SHA-256( 0x00 || job_id[16] || u64be(seq) || str(kind) || u32be(schema_version)
//!                   || str(recorded_at) || u64be(len(payload)) || payload )
//! digest = SHA-256( 0x01 || previous_digest[32] || leaf[32] )      previous of seq 1: 32 zero bytes
//! mac    = HMAC-SHA256( key, 0x02 || digest[32] )
//! str(s) = u32be(len(s)) || UTF-8 bytes of s
//! ```
//!
//! The leading byte separates the three domains (as Certificate Transparency
//! separates leaves from nodes), so no event encoding can be mistaken for a
//! link and no digest for a MAC input.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest as _, Sha256};

use crate::events::EventRecord;

const LEAF_PREFIX: u8 = 0x00;
const LINK_PREFIX: u8 = 0x01;
const MAC_PREFIX: u8 = 0x02;

/// A SHA-256 chain digest, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The "previous digest" of a job's first event.
    pub const GENESIS: Digest = Digest([0; 32]);

    /// The digest as 64 lowercase hex digits, as stored in the database.
    pub fn to_hex(&self) -> String {
        hex64(&self.0)
    }

    /// Parses 64 lowercase hex digits (the stored form).
    pub fn from_hex(text: &str) -> Option<Digest> {
        parse_hex32(text).map(Digest)
    }

    /// Whether `text` is this digest's stored form, without allocating.
    pub fn matches_hex(&self, text: &str) -> bool {
        let mut buffer = [0u8; 64];
        // 32 bytes always fit 64 hex digits.
        hex::encode_to_slice(self.0, &mut buffer).is_ok() && buffer == text.as_bytes()
    }

    /// Parses `sha256:<64 lowercase hex>` (the displayed form).
    pub fn parse(text: &str) -> Option<Digest> {
        text.strip_prefix("sha256:").and_then(Digest::from_hex)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// 32 bytes as 64 lowercase hex digits, without going through `char`s one at
/// a time (this runs twice for every event appended).
fn hex64(bytes: &[u8; 32]) -> String {
    let mut buffer = [0u8; 64];
    // 32 bytes always fit 64 hex digits, and hex digits are ASCII.
    let _ = hex::encode_to_slice(bytes, &mut buffer);
    String::from_utf8_lossy(&buffer).into_owned()
}

/// Only lowercase hex: the stored and displayed forms are canonical, so an
/// edit that changes the case of a digit is still an edit.
fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn put_str(hasher: &mut Sha256, text: &str) {
    // Stored fields are far below 4 GiB (SQLite's limit is 1 GB); the cap
    // keeps a longer one from wrapping to a short length.
    hasher.update(u32::try_from(text.len()).unwrap_or(u32::MAX).to_be_bytes());
    hasher.update(text.as_bytes());
}

/// The leaf hash of one event's stored bytes (its digest and MAC excluded).
pub fn leaf_hash(record: &EventRecord) -> [u8; 32] {
    leaf_hash_at(record, record.seq)
}

/// The leaf hash the record would have at `seq`; lets `verify` recognise an
/// event that was moved rather than changed.
pub fn leaf_hash_at(record: &EventRecord, seq: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(record.job_id.as_bytes());
    hasher.update(seq.to_be_bytes());
    put_str(&mut hasher, &record.kind);
    hasher.update(record.schema_version.to_be_bytes());
    put_str(&mut hasher, &record.recorded_at);
    hasher.update((record.payload.len() as u64).to_be_bytes());
    hasher.update(record.payload.as_bytes());
    hasher.finalize().into()
}

/// Links a leaf to the previous digest of its job.
pub fn link(previous: &Digest, leaf: &[u8; 32]) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update([LINK_PREFIX]);
    hasher.update(previous.0);
    hasher.update(leaf);
    Digest(hasher.finalize().into())
}

/// The digest `record` must carry when it follows `previous`.
pub fn chain(previous: &Digest, record: &EventRecord) -> Digest {
    link(previous, &leaf_hash(record))
}

/// Gives `records`, a job's next events in order after the one whose digest
/// is `head`, their chain digests, and their MACs when a key is given.
pub fn seal(head: Digest, records: &mut [EventRecord], key: Option<&HeadKey>) {
    let mut head = head;
    for record in records {
        head = chain(&head, record);
        record.mac = key.map(|key| key.mac(&head).to_hex());
        record.digest = Some(head.to_hex());
    }
}

/// An HMAC-SHA256 tag of a head, written `hmac-sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeadMac(pub [u8; 32]);

impl HeadMac {
    /// The tag as 64 lowercase hex digits, as stored in the database.
    pub fn to_hex(&self) -> String {
        hex64(&self.0)
    }

    /// Parses 64 lowercase hex digits (the stored form).
    pub fn from_hex(text: &str) -> Option<HeadMac> {
        parse_hex32(text).map(HeadMac)
    }
}

impl fmt::Display for HeadMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hmac-sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for HeadMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The smallest key accepted, in bytes: shorter keys are guessable.
pub const KEY_BYTES_MIN: usize = 16;

/// A secret key that authenticates heads.
#[derive(Clone)]
pub struct HeadKey(Vec<u8>);

impl fmt::Debug for HeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeadKey(<secret>)")
    }
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file cannot be read.
    #[error("{}: cannot read key file: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key is too short.
    #[error("key has {bytes} bytes; at least {KEY_BYTES_MIN} are required")]
    TooShort {
        /// Its length.
        bytes: usize,
    },
}

impl HeadKey {
    /// A key from raw bytes.
    ///
    /// # Errors
    /// [`KeyError::TooShort`] below [`KEY_BYTES_MIN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<HeadKey, KeyError> {
        let bytes = bytes.into();
        if bytes.len() < KEY_BYTES_MIN {
            return Err(KeyError::TooShort { bytes: bytes.len() });
        }
        Ok(HeadKey(bytes))
    }

    /// The key in a file: its bytes, less one trailing newline (so `echo`
    /// and editors make the same key).
    ///
    /// # Errors
    /// [`KeyError`] when the file cannot be read or the key is too short.
    pub fn from_file(path: &Path) -> Result<HeadKey, KeyError> {
        let mut bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        HeadKey::new(bytes)
    }

    fn hmac(&self) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(&[MAC_PREFIX]);
        mac
    }

    /// The tag of `head` under this key.
    pub fn mac(&self, head: &Digest) -> HeadMac {
        let mut mac = self.hmac();
        mac.update(&head.0);
        HeadMac(mac.finalize().into_bytes().into())
    }

    /// Whether `tag` authenticates `head` under this key (constant time).
    pub fn verify(&self, head: &Digest, tag: &HeadMac) -> bool {
        let mut mac = self.hmac();
        mac.update(&head.0);
        mac.verify_slice(&tag.0).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventRecord;
    use uuid::Uuid;

    fn record(seq: u64, payload: &str) -> EventRecord {
        EventRecord {
            position: 0,
            job_id: Uuid::from_u128(1),
            seq,
            kind: "StepStarted".into(),
            schema_version: 2,
            recorded_at: "2000-01-01T00:00:00.000000Z".into(),
            payload: payload.into(),
            digest: None,
            mac: None,
        }
    }

    #[test]
    fn digests_round_trip_through_both_forms() {
        let d = chain(&Digest::GENESIS, &record(1, "{}"));
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::parse(&d.to_string()), Some(d));
        assert!(d.to_string().starts_with("sha256:"));
        assert_eq!(Digest::from_hex(&d.to_hex().to_uppercase()), None);
        assert_eq!(Digest::parse(&d.to_hex()), None);
    }

    #[test]
    fn every_field_and_the_previous_digest_count() {
        let base = record(1, r#"{"step_index":0}"#);
        let d = chain(&Digest::GENESIS, &base);
        let variants = [
            EventRecord {
                job_id: Uuid::from_u128(2),
                ..base.clone()
            },
            EventRecord {
                seq: 2,
                ..base.clone()
            },
            EventRecord {
                kind: "StepSucceeded".into(),
                ..base.clone()
            },
            EventRecord {
                schema_version: 1,
                ..base.clone()
            },
            EventRecord {
                recorded_at: "2000-01-01T00:00:00.000001Z".into(),
                ..base.clone()
            },
            EventRecord {
                payload: r#"{"step_index":1}"#.into(),
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(chain(&Digest::GENESIS, &v), d, "{v:?}");
        }
        assert_ne!(chain(&d, &base), d);
        // Position, digest and MAC are not part of the leaf.
        let moved = EventRecord {
            position: 9,
            digest: Some("x".into()),
            ..base.clone()
        };
        assert_eq!(chain(&Digest::GENESIS, &moved), d);
    }

    #[test]
    fn field_boundaries_cannot_be_shifted() {
        // The same bytes split differently between kind and recorded_at.
        let a = EventRecord {
            kind: "ab".into(),
            recorded_at: "c".into(),
            ..record(1, "{}")
        };
        let b = EventRecord {
            kind: "a".into(),
            recorded_at: "bc".into(),
            ..record(1, "{}")
        };
        assert_ne!(leaf_hash(&a), leaf_hash(&b));
    }

    #[test]
    fn macs_depend_on_key_and_head() {
        let key = HeadKey::new(*b"0123456789abcdef").unwrap();
        let other = HeadKey::new(*b"0123456789abcdeX").unwrap();
        let d = chain(&Digest::GENESIS, &record(1, "{}"));
        let tag = key.mac(&d);
        assert!(key.verify(&d, &tag));
        assert!(!other.verify(&d, &tag));
        assert!(!key.verify(&Digest::GENESIS, &tag));
        assert!(matches!(
            HeadKey::new(*b"short"),
            Err(KeyError::TooShort { bytes: 5 })
        ));
    }
}
