//! Signed notes (C2SP `signed-note`, the format of golang.org/x/mod/sumdb/note)
//! and their Ed25519 keys: the signature format of checkpoints, witness
//! cosignatures (C2SP `tlog-cosignature`) and signed plans.
//!
//! ```text
//! note          = text (UTF-8, ends in a newline) "\n" signature-line+
//! signature-line= "— " key-name " " base64( u32be(key id) || signature ) "\n"
//! key id        = SHA-256( key-name || 0x0A || type || public key )[0..4]
//! verifier key  = key-name "+" hex8(key id) "+" base64( type || public key )
//! private key   = "PRIVATE+KEY+" key-name "+" hex8(key id) "+" base64( type || seed )
//! ```
//!
//! Two signature types: 0x01, Ed25519 over the text ([`KeyType::Ed25519`],
//! a log's or a plan signer's key), and 0x04, timestamped Ed25519
//! cosignatures ([`KeyType::Cosignature`], a witness's key): the signature is
//! `u64be(timestamp) || Ed25519("cosignature/v1\ntime <timestamp>\n" || text)`.
//! The private-key text is golang.org/x/mod/sumdb/note's signer-key
//! encoding, so Go's tools read the keys made here and the other way round.
//!
//! Nothing here reads a clock or a file: a cosignature's timestamp comes
//! from the caller. Only key generation asks the system for random bytes.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// At most this many signature lines in a note (golang.org/x/mod/sumdb/note
/// refuses more; the spec asks that at least 16 be accepted).
pub const SIGNATURES_MAX: usize = 100;

/// At most this many bytes of text in a note: room for a large plan.
pub const NOTE_TEXT_BYTES_MAX: usize = 16 << 20;

/// At most this many bytes in one signature line: room for a 255-byte name
/// and a post-quantum signature (up to about 5 kB).
pub const SIGNATURE_LINE_BYTES_MAX: usize = 8 << 10;

/// At most this many bytes in a whole note; a longer input is refused unread.
pub const NOTE_BYTES_MAX: usize =
    NOTE_TEXT_BYTES_MAX + 1 + SIGNATURES_MAX * SIGNATURE_LINE_BYTES_MAX;

/// At most this many bytes in the name of a key made or read here.
pub const KEY_NAME_BYTES_MAX: usize = 255;

/// The first line of the message a cosignature signs (its domain).
const COSIGNATURE_HEADER: &str = "cosignature/v1";
/// Bytes of a cosignature: the timestamp, then the Ed25519 signature.
const COSIGNATURE_BYTES: usize = 8 + 64;
const PRIVATE_PREFIX: &str = "PRIVATE+KEY+";
const SIGNATURE_PREFIX: &str = "— ";

/// The signature types supported, by their signed-note type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// 0x01: Ed25519 over the note text (a log's checkpoints, signed plans).
    Ed25519,
    /// 0x04: a C2SP tlog-cosignature `cosignature/v1`, Ed25519 over the text
    /// with a timestamp (a witness's cosignatures).
    Cosignature,
}

impl KeyType {
    /// The type byte.
    pub const fn byte(self) -> u8 {
        match self {
            KeyType::Ed25519 => 0x01,
            KeyType::Cosignature => 0x04,
        }
    }

    fn from_byte(byte: u8) -> Option<KeyType> {
        match byte {
            0x01 => Some(KeyType::Ed25519),
            0x04 => Some(KeyType::Cosignature),
            _ => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::Ed25519 => "Ed25519 signing",
            KeyType::Cosignature => "Ed25519 cosigning (cosignature/v1)",
        })
    }
}

/// A key id: the first four bytes of SHA-256(name ‖ 0x0A ‖ type ‖ public
/// key), shown as 8 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId(pub u32);

impl KeyId {
    /// The id of a key by its name, type and public key.
    pub fn of(name: &str, key_type: KeyType, public_key: &[u8; 32]) -> KeyId {
        let mut hasher = Sha256::new();
        hasher.update(name.as_bytes());
        hasher.update([b'\n', key_type.byte()]);
        hasher.update(public_key);
        let hash: [u8; 32] = hasher.finalize().into();
        KeyId(u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// Whether `name` may name a signature: non-empty, with no Unicode space and
/// no `+` (the spec's rule). Names of keys made or read here must also be
/// at most [`KEY_NAME_BYTES_MAX`] bytes without control characters
/// ([`is_valid_key_name`]).
pub fn is_valid_signature_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '+')
}

/// Whether `name` may name a key made or read here: a valid signature name
/// of at most [`KEY_NAME_BYTES_MAX`] bytes, without control characters (a
/// note cannot carry them).
pub fn is_valid_key_name(name: &str) -> bool {
    is_valid_signature_name(name)
        && name.len() <= KEY_NAME_BYTES_MAX
        && !name.chars().any(char::is_control)
}

/// Why a key cannot be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The name breaks the key-name rules.
    #[error(
        "{0:?} is not a valid key name: it must be 1 to {KEY_NAME_BYTES_MAX} bytes, with no spaces, '+' or control characters"
    )]
    BadName(String),
    /// The text is not a verifier key.
    #[error("not a verifier key (NAME+HASH+BASE64): {0}")]
    Malformed(&'static str),
    /// The text is not a private key (its content is never echoed).
    #[error("not a private key (PRIVATE+KEY+NAME+HASH+BASE64): {0}")]
    MalformedPrivate(&'static str),
    /// A signature type other than 0x01 and 0x04.
    #[error(
        "unsupported signature type 0x{0:02x}: only 0x01 (Ed25519) and 0x04 (Ed25519 cosignature/v1) are supported"
    )]
    UnsupportedType(u8),
    /// The stated key id is not the one the key's name, type and public key give.
    #[error("key {name}: its key id is {stated}, but its name and public key give {computed}")]
    KeyIdMismatch {
        /// The key's name.
        name: String,
        /// The id written in the key.
        stated: KeyId,
        /// The id computed.
        computed: KeyId,
    },
    /// The 32 bytes are not an Ed25519 public key.
    #[error("key {name}: not a valid Ed25519 public key")]
    BadPublicKey {
        /// The key's name.
        name: String,
    },
    /// The system gave no random bytes for a new key.
    #[error("cannot get random bytes for a new key: {source}")]
    Random {
        /// The system's error.
        source: getrandom::Error,
    },
}

/// The three `+`-separated fields of a key: name, key id, type and key bytes.
fn split_key(text: &str) -> Result<(&str, KeyId, KeyType, Vec<u8>), &'static str> {
    let mut fields = text.splitn(3, '+');
    let (Some(name), Some(hash), Some(data)) = (fields.next(), fields.next(), fields.next()) else {
        return Err("it needs three fields separated by '+'");
    };
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if hash.len() != 8 || !hash.bytes().all(lower_hex) {
        return Err("the key id must be 8 lowercase hex digits");
    }
    let id =
        u32::from_str_radix(hash, 16).map_err(|_| "the key id must be 8 lowercase hex digits")?;
    let bytes = BASE64
        .decode(data)
        .map_err(|_| "the key data is not standard base64")?;
    let Some((&type_byte, key)) = bytes.split_first() else {
        return Err("the key data is empty");
    };
    let key_type = KeyType::from_byte(type_byte).ok_or("unsupported signature type")?;
    if key.len() != 32 {
        return Err("an Ed25519 key has 32 bytes after its type byte");
    }
    Ok((name, KeyId(id), key_type, key.to_vec()))
}

/// Re-reads the type byte so that an unknown type is named in the error.
fn type_error(text: &str) -> Option<KeyError> {
    let data = text.splitn(3, '+').nth(2)?;
    let byte = *BASE64.decode(data).ok()?.first()?;
    KeyType::from_byte(byte)
        .is_none()
        .then_some(KeyError::UnsupportedType(byte))
}

/// A public key that checks a note's signatures: a signed-note verifier key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_type: KeyType,
    id: KeyId,
    key: VerifyingKey,
}

impl VerifierKey {
    /// The verifier key of an Ed25519 public key under `name`.
    ///
    /// # Errors
    /// [`KeyError::BadName`], or [`KeyError::BadPublicKey`] for bytes that
    /// are not a curve point.
    pub fn new(
        name: &str,
        key_type: KeyType,
        public_key: &[u8; 32],
    ) -> Result<VerifierKey, KeyError> {
        if !is_valid_key_name(name) {
            return Err(KeyError::BadName(name.to_string()));
        }
        let key = VerifyingKey::from_bytes(public_key).map_err(|_| KeyError::BadPublicKey {
            name: name.to_string(),
        })?;
        Ok(VerifierKey {
            name: name.to_string(),
            key_type,
            id: KeyId::of(name, key_type, public_key),
            key,
        })
    }

    /// Reads `NAME+HASH+BASE64` (no surrounding spaces or newline).
    ///
    /// # Errors
    /// [`KeyError`] naming what is wrong; the key id must match.
    pub fn parse(text: &str) -> Result<VerifierKey, KeyError> {
        let (name, stated, key_type, key) = split_key(text)
            .map_err(|reason| type_error(text).unwrap_or(KeyError::Malformed(reason)))?;
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&key);
        let verifier = VerifierKey::new(name, key_type, &public_key)?;
        verifier.check_stated_id(stated)?;
        Ok(verifier)
    }

    /// `NAME+HASH+BASE64(type ‖ key_bytes)`: the verifier key's text with
    /// its public key, the private key's (after its prefix) with the seed.
    fn encode(&self, key_bytes: &[u8; 32]) -> String {
        let mut data = [0u8; 33];
        data[0] = self.key_type.byte();
        data[1..].copy_from_slice(key_bytes);
        let text = format!("{}+{}+{}", self.name, self.id, BASE64.encode(data));
        data.fill(0);
        text
    }

    fn check_stated_id(&self, stated: KeyId) -> Result<(), KeyError> {
        if self.id != stated {
            return Err(KeyError::KeyIdMismatch {
                name: self.name.clone(),
                stated,
                computed: self.id,
            });
        }
        Ok(())
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key's signature type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Whether `signature` (the bytes after the key id) is this key's
    /// signature of `text`; for a cosigning key, also the signature's
    /// timestamp. `None` when it does not verify.
    fn check(&self, text: &str, signature: &[u8]) -> Option<Option<u64>> {
        match self.key_type {
            KeyType::Ed25519 => {
                let signature = Signature::from_slice(signature).ok()?;
                self.key.verify(text.as_bytes(), &signature).ok()?;
                Some(None)
            }
            KeyType::Cosignature => {
                if signature.len() != COSIGNATURE_BYTES {
                    return None;
                }
                let (stamp, signature) = signature.split_at(8);
                let timestamp = u64::from_be_bytes(stamp.try_into().ok()?);
                if timestamp > i64::MAX as u64 {
                    return None;
                }
                let signature = Signature::from_slice(signature).ok()?;
                let message = cosigned_message(timestamp, text);
                self.key.verify(message.as_bytes(), &signature).ok()?;
                Some(Some(timestamp))
            }
        }
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifierKey({self})")
    }
}

impl FromStr for VerifierKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<VerifierKey, KeyError> {
        VerifierKey::parse(text)
    }
}

/// The message a cosignature signs: the header, the timestamp line, the text.
fn cosigned_message(timestamp: u64, text: &str) -> String {
    format!("{COSIGNATURE_HEADER}\ntime {timestamp}\n{text}")
}

/// A private key that signs notes (type 0x01) or cosigns checkpoints
/// (type 0x04). Its `Debug` shows no secret; the secret is zeroed on drop.
#[derive(Clone)]
pub struct SignerKey {
    public: VerifierKey,
    key: SigningKey,
}

impl SignerKey {
    /// A new random key (from the operating system's generator).
    ///
    /// # Errors
    /// [`KeyError::BadName`], [`KeyError::Random`].
    pub fn generate(name: &str, key_type: KeyType) -> Result<SignerKey, KeyError> {
        if !is_valid_key_name(name) {
            return Err(KeyError::BadName(name.to_string()));
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|source| KeyError::Random { source })?;
        let key = SignerKey::from_seed(name, key_type, &seed);
        seed.fill(0);
        key
    }

    /// The key of an Ed25519 seed (RFC 8032's 32-byte private key).
    ///
    /// # Errors
    /// [`KeyError::BadName`].
    pub fn from_seed(
        name: &str,
        key_type: KeyType,
        seed: &[u8; 32],
    ) -> Result<SignerKey, KeyError> {
        let key = SigningKey::from_bytes(seed);
        let public = VerifierKey::new(name, key_type, key.verifying_key().as_bytes())?;
        Ok(SignerKey { public, key })
    }

    /// Reads `PRIVATE+KEY+NAME+HASH+BASE64(type ‖ seed)` (no surrounding
    /// spaces or newline). Errors never echo the text.
    ///
    /// # Errors
    /// [`KeyError`] naming what is wrong; the key id must match the key.
    pub fn parse(text: &str) -> Result<SignerKey, KeyError> {
        let rest = text
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or(KeyError::MalformedPrivate(
                "it must start with PRIVATE+KEY+",
            ))?;
        let (name, stated, key_type, seed) = split_key(rest)
            .map_err(|reason| type_error(rest).unwrap_or(KeyError::MalformedPrivate(reason)))?;
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&seed);
        let key = SignerKey::from_seed(name, key_type, &bytes);
        bytes.fill(0);
        let key = key?;
        key.public.check_stated_id(stated)?;
        Ok(key)
    }

    /// The private-key text. It is the secret: write it only where the
    /// key's owner alone can read it.
    pub fn to_private_text(&self) -> String {
        format!(
            "{PRIVATE_PREFIX}{}",
            self.public.encode(self.key.as_bytes())
        )
    }

    /// The public half, to give to whoever checks the signatures (its name,
    /// type and id are this key's).
    pub fn verifier_key(&self) -> &VerifierKey {
        &self.public
    }
}

impl fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SignerKey({}+{}, <secret>)",
            self.public.name, self.public.id
        )
    }
}

/// One signature line of a note, verified or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteSignature {
    name: String,
    key_id: KeyId,
    signature: Vec<u8>,
}

impl NoteSignature {
    /// The signing key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The signing key's id.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The signature bytes (after the key id).
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }

    /// The timestamp a cosignature line claims (its first 8 bytes, when it
    /// has a cosignature's length), unverified: trust it only once the
    /// line verified under a cosigning key.
    pub fn claimed_timestamp(&self) -> Option<u64> {
        if self.signature.len() != COSIGNATURE_BYTES {
            return None;
        }
        let stamp: [u8; 8] = self.signature[..8].try_into().ok()?;
        Some(u64::from_be_bytes(stamp))
    }

    /// Whether this line is by the key `key`, by name and id.
    pub fn is_by(&self, key: &VerifierKey) -> bool {
        self.name == key.name && self.key_id == key.id
    }

    /// Reads one line (without its newline).
    fn parse(line: &str) -> Result<NoteSignature, &'static str> {
        if line.len() > SIGNATURE_LINE_BYTES_MAX {
            return Err("a signature line is too long");
        }
        let rest = line
            .strip_prefix(SIGNATURE_PREFIX)
            .ok_or("a signature line must start with an em dash and a space")?;
        let (name, data) = rest
            .split_once(' ')
            .ok_or("a signature line needs a key name, a space and the signature")?;
        if !is_valid_signature_name(name) {
            return Err("a signature's key name is empty or has '+' or a space");
        }
        let bytes = BASE64
            .decode(data)
            .map_err(|_| "a signature is not standard base64")?;
        if bytes.len() < 5 {
            return Err("a signature needs a key id and at least one byte");
        }
        let (id, signature) = bytes.split_at(4);
        Ok(NoteSignature {
            name: name.to_string(),
            key_id: KeyId(u32::from_be_bytes([id[0], id[1], id[2], id[3]])),
            signature: signature.to_vec(),
        })
    }
}

impl fmt::Display for NoteSignature {
    /// The signature line, without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut data = Vec::with_capacity(4 + self.signature.len());
        data.extend_from_slice(&self.key_id.0.to_be_bytes());
        data.extend_from_slice(&self.signature);
        write!(f, "{SIGNATURE_PREFIX}{} {}", self.name, BASE64.encode(data))
    }
}

/// Why bytes are not a well-formed signed note (or a text cannot be one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoteError {
    /// Longer than [`NOTE_BYTES_MAX`] (or a text than [`NOTE_TEXT_BYTES_MAX`]).
    #[error("the note has {bytes} bytes; at most {max} are accepted")]
    TooLarge {
        /// Its length.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Not valid UTF-8.
    #[error("the note is not valid UTF-8")]
    NotUtf8,
    /// A control character other than newline.
    #[error(
        "the note has a control character (U+{code:04X}) at byte {offset}; only newlines are allowed"
    )]
    ControlCharacter {
        /// The character's code.
        code: u32,
        /// Its byte offset.
        offset: usize,
    },
    /// The text does not end in a newline.
    #[error("the note text must end in a newline")]
    NoFinalNewline,
    /// No blank line followed by signature lines ending in a newline.
    #[error(
        "the note has no signatures: it needs a blank line, then signature lines, each ending in a newline"
    )]
    NoSignatures,
    /// A signature line is malformed.
    #[error("signature line {line} is malformed: {reason}")]
    BadSignatureLine {
        /// Its number among the signature lines, from 1.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// More than [`SIGNATURES_MAX`] signature lines.
    #[error("the note has more than {SIGNATURES_MAX} signatures")]
    TooManySignatures,
}

/// Why a key cannot sign a note.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// A signing key used to cosign, or a cosigning key used to sign.
    #[error("key {name} is an {found} key; this needs an {wanted} key")]
    WrongKeyType {
        /// The key's name.
        name: String,
        /// Its type.
        found: KeyType,
        /// The type needed.
        wanted: KeyType,
    },
    /// A cosignature timestamp past 2^63 − 1.
    #[error("timestamp {0} is past the largest a cosignature may carry (2^63 - 1)")]
    TimestampOutOfRange(u64),
    /// The note already has [`SIGNATURES_MAX`] signatures.
    #[error("the note already has {SIGNATURES_MAX} signatures")]
    TooManySignatures,
}

/// Why a note's signatures do not establish it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// No key given signed the note: it cannot be checked (maybe a rotated
    /// key was not given). Not a sign of tampering by itself.
    #[error(
        "unverifiable: no key given signed this note (signed by {})",
        list_or_none(signers)
    )]
    Unverifiable {
        /// `NAME+KEYID` of each key that did sign.
        signers: Vec<String>,
    },
    /// A key given signed the note, and its signature does not verify: the
    /// text or the signature was changed.
    #[error(
        "invalid: the signature by {name}+{key_id} does not verify; the note was altered or the signature forged"
    )]
    Invalid {
        /// The key's name.
        name: String,
        /// The key's id.
        key_id: KeyId,
    },
    /// Two different keys given share a name and a key id.
    #[error("two different keys given are both {name}+{key_id}: the key list is not trustworthy")]
    Ambiguous {
        /// The name.
        name: String,
        /// The key id.
        key_id: KeyId,
    },
}

fn list_or_none(signers: &[String]) -> String {
    if signers.is_empty() {
        "no one".to_string()
    } else {
        signers.join(", ")
    }
}

/// A signature that verified under a key given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSignature {
    /// The key whose signature it is.
    pub key: VerifierKey,
    /// For a cosignature, the time it carries (POSIX seconds).
    pub timestamp: Option<u64>,
}

/// What checking a note found: the signatures that verified (one per key)
/// and those by keys not given, kept unchecked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// Signatures by keys given, each verified.
    pub verified: Vec<VerifiedSignature>,
    /// Signatures by keys not given (not checked), duplicates dropped.
    pub unknown: Vec<NoteSignature>,
}

/// A signed note: a text and its signature lines, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    text: String,
    signatures: Vec<NoteSignature>,
}

/// Checks the size, UTF-8 and control-character rules common to a whole
/// note and a text about to be signed.
fn check_characters(bytes: &[u8], max: usize) -> Result<&str, NoteError> {
    if bytes.len() > max {
        return Err(NoteError::TooLarge {
            bytes: bytes.len(),
            max,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| NoteError::NotUtf8)?;
    if let Some(offset) = bytes.iter().position(|&b| b < 0x20 && b != b'\n') {
        return Err(NoteError::ControlCharacter {
            code: u32::from(bytes[offset]),
            offset,
        });
    }
    Ok(text)
}

impl Note {
    /// An unsigned note of `text`, to be signed.
    ///
    /// # Errors
    /// [`NoteError`] when the text is too long, does not end in a newline,
    /// or has a control character other than newline.
    pub fn new(text: impl Into<String>) -> Result<Note, NoteError> {
        let text = text.into();
        check_characters(text.as_bytes(), NOTE_TEXT_BYTES_MAX)?;
        if !text.ends_with('\n') {
            return Err(NoteError::NoFinalNewline);
        }
        Ok(Note {
            text,
            signatures: Vec::new(),
        })
    }

    /// Reads a signed note. The text is separated from the signatures by
    /// the last blank line; nothing is verified yet (see [`Note::verify`]).
    ///
    /// # Errors
    /// [`NoteError`] naming the first rule broken.
    pub fn parse(bytes: &[u8]) -> Result<Note, NoteError> {
        let all = check_characters(bytes, NOTE_BYTES_MAX)?;
        let split = all.rfind("\n\n").ok_or(NoteError::NoSignatures)?;
        let (text, block) = (&all[..=split], &all[split + 2..]);
        if text.len() > NOTE_TEXT_BYTES_MAX {
            return Err(NoteError::TooLarge {
                bytes: text.len(),
                max: NOTE_TEXT_BYTES_MAX,
            });
        }
        let lines = block.strip_suffix('\n').ok_or(NoteError::NoSignatures)?;
        let mut signatures = Vec::new();
        for (number, line) in lines.split('\n').enumerate() {
            if number == SIGNATURES_MAX {
                return Err(NoteError::TooManySignatures);
            }
            let signature =
                NoteSignature::parse(line).map_err(|reason| NoteError::BadSignatureLine {
                    line: number + 1,
                    reason,
                })?;
            signatures.push(signature);
        }
        Ok(Note {
            text: text.to_string(),
            signatures,
        })
    }

    /// The signed text, with its final newline.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The signature lines, in order.
    pub fn signatures(&self) -> &[NoteSignature] {
        &self.signatures
    }

    /// Adds a signature line, in place of any by the same key (name and
    /// id), after the others. It is not verified here.
    ///
    /// # Errors
    /// [`SignError::TooManySignatures`].
    pub fn add_signature(&mut self, signature: NoteSignature) -> Result<(), SignError> {
        self.signatures
            .retain(|s| !(s.name == signature.name && s.key_id == signature.key_id));
        if self.signatures.len() >= SIGNATURES_MAX {
            return Err(SignError::TooManySignatures);
        }
        self.signatures.push(signature);
        Ok(())
    }

    /// Signs the text with an Ed25519 signing key (type 0x01).
    ///
    /// # Errors
    /// [`SignError::WrongKeyType`] for a cosigning key;
    /// [`SignError::TooManySignatures`].
    pub fn sign(&mut self, key: &SignerKey) -> Result<(), SignError> {
        require_type(key, KeyType::Ed25519)?;
        let signature = key.key.sign(self.text.as_bytes()).to_bytes().to_vec();
        self.add_signature(NoteSignature {
            name: key.public.name.clone(),
            key_id: key.public.id,
            signature,
        })
    }

    /// Cosigns the text with a cosigning key (type 0x04) at `timestamp`
    /// (POSIX seconds, from the caller's clock).
    ///
    /// # Errors
    /// [`SignError::WrongKeyType`] for a plain signing key;
    /// [`SignError::TimestampOutOfRange`]; [`SignError::TooManySignatures`].
    pub fn cosign(&mut self, key: &SignerKey, timestamp: u64) -> Result<(), SignError> {
        require_type(key, KeyType::Cosignature)?;
        if timestamp > i64::MAX as u64 {
            return Err(SignError::TimestampOutOfRange(timestamp));
        }
        let message = cosigned_message(timestamp, &self.text);
        let mut signature = Vec::with_capacity(COSIGNATURE_BYTES);
        signature.extend_from_slice(&timestamp.to_be_bytes());
        signature.extend_from_slice(&key.key.sign(message.as_bytes()).to_bytes());
        self.add_signature(NoteSignature {
            name: key.public.name.clone(),
            key_id: key.public.id,
            signature,
        })
    }

    /// Checks the signatures against the keys given. A signature by a key
    /// not given is kept unchecked; one by a key given must verify.
    ///
    /// # Errors
    /// [`VerifyError::Invalid`] when a given key's signature does not
    /// verify; [`VerifyError::Unverifiable`] when no given key signed;
    /// [`VerifyError::Ambiguous`] when two different keys given share a
    /// name and id that a signature names.
    pub fn verify(&self, known: &[VerifierKey]) -> Result<Verification, VerifyError> {
        let mut verification = Verification {
            verified: Vec::new(),
            unknown: Vec::new(),
        };
        for signature in &self.signatures {
            let mut matching = known.iter().filter(|key| signature.is_by(key));
            let Some(key) = matching.next() else {
                if !verification.unknown.contains(signature) {
                    verification.unknown.push(signature.clone());
                }
                continue;
            };
            if matching.any(|other| other != key) {
                return Err(VerifyError::Ambiguous {
                    name: signature.name.clone(),
                    key_id: signature.key_id,
                });
            }
            let timestamp = key.check(&self.text, &signature.signature).ok_or_else(|| {
                VerifyError::Invalid {
                    name: signature.name.clone(),
                    key_id: signature.key_id,
                }
            })?;
            if !verification.verified.iter().any(|v| v.key == *key) {
                verification.verified.push(VerifiedSignature {
                    key: key.clone(),
                    timestamp,
                });
            }
        }
        if verification.verified.is_empty() {
            return Err(VerifyError::Unverifiable {
                signers: self.signer_names(),
            });
        }
        Ok(verification)
    }

    /// `NAME+KEYID` of each distinct signer, in order.
    pub fn signer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for signature in &self.signatures {
            let name = format!("{}+{}", signature.name, signature.key_id);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

fn require_type(key: &SignerKey, wanted: KeyType) -> Result<(), SignError> {
    if key.public.key_type != wanted {
        return Err(SignError::WrongKeyType {
            name: key.public.name.clone(),
            found: key.public.key_type,
            wanted,
        });
    }
    Ok(())
}

impl fmt::Display for Note {
    /// The note as text: the text, a blank line, each signature line. A
    /// note with no signature gives text that [`Note::parse`] refuses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        f.write_str("\n")?;
        for signature in &self.signatures {
            writeln!(f, "{signature}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, key_type: KeyType, byte: u8) -> SignerKey {
        SignerKey::from_seed(name, key_type, &[byte; 32]).unwrap()
    }

    #[test]
    fn keys_round_trip_through_their_texts() {
        for key_type in [KeyType::Ed25519, KeyType::Cosignature] {
            let signer = key("example.com/log", key_type, 7);
            let private = signer.to_private_text();
            assert!(private.starts_with("PRIVATE+KEY+example.com/log+"));
            let again = SignerKey::parse(&private).unwrap();
            assert_eq!(again.verifier_key(), signer.verifier_key());
            let public = signer.verifier_key().to_string();
            assert_eq!(&VerifierKey::parse(&public).unwrap(), signer.verifier_key());
            assert!(!format!("{signer:?}").contains(&private[30..]));
        }
    }

    #[test]
    fn names_follow_the_rules() {
        assert!(is_valid_key_name("example.com/log42"));
        for bad in [
            "",
            "a b",
            "a+b",
            "a\u{a0}b",
            "a\u{2003}b",
            "a\tb",
            "a\u{1}b",
        ] {
            assert!(!is_valid_key_name(bad), "{bad:?}");
        }
        assert!(!is_valid_key_name(&"a".repeat(256)));
        assert!(matches!(
            SignerKey::generate("a b", KeyType::Ed25519),
            Err(KeyError::BadName(_))
        ));
    }

    #[test]
    fn generated_keys_differ_and_sign() {
        let a = SignerKey::generate("a", KeyType::Ed25519).unwrap();
        let b = SignerKey::generate("a", KeyType::Ed25519).unwrap();
        assert_ne!(a.verifier_key(), b.verifier_key());
        let mut note = Note::new("hello\n").unwrap();
        note.sign(&a).unwrap();
        assert!(note.verify(&[a.verifier_key().clone()]).is_ok());
        assert!(matches!(
            note.verify(&[b.verifier_key().clone()]),
            Err(VerifyError::Unverifiable { .. })
        ));
    }

    #[test]
    fn wrong_key_types_and_timestamps_are_refused() {
        let signer = key("log", KeyType::Ed25519, 1);
        let witness = key("witness", KeyType::Cosignature, 2);
        let mut note = Note::new("a\nb\nc\n").unwrap();
        assert!(matches!(
            note.cosign(&signer, 1),
            Err(SignError::WrongKeyType { .. })
        ));
        assert!(matches!(
            note.sign(&witness),
            Err(SignError::WrongKeyType { .. })
        ));
        assert_eq!(
            note.cosign(&witness, 1 << 63),
            Err(SignError::TimestampOutOfRange(1 << 63))
        );
        note.cosign(&witness, 1_700_000_000).unwrap();
        let verified = note.verify(&[witness.verifier_key().clone()]).unwrap();
        assert_eq!(verified.verified[0].timestamp, Some(1_700_000_000));
    }

    #[test]
    fn resigning_replaces_the_signature_of_the_same_key() {
        let witness = key("witness", KeyType::Cosignature, 2);
        let mut note = Note::new("a\nb\nc\n").unwrap();
        note.cosign(&witness, 1).unwrap();
        note.cosign(&witness, 2).unwrap();
        assert_eq!(note.signatures().len(), 1);
        let verified = note.verify(&[witness.verifier_key().clone()]).unwrap();
        assert_eq!(verified.verified[0].timestamp, Some(2));
    }

    #[test]
    fn texts_that_cannot_be_signed_are_refused() {
        assert_eq!(Note::new("no newline"), Err(NoteError::NoFinalNewline));
        assert!(matches!(
            Note::new("tab\there\n"),
            Err(NoteError::ControlCharacter { code: 9, offset: 3 })
        ));
    }
}
