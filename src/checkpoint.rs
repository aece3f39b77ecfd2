//! Checkpoints (C2SP `tlog-checkpoint`): a log's tree head as note text,
//! signed as a [`Note`] by the log and cosigned by witnesses (C2SP
//! `tlog-cosignature`).
//!
//! ```text
//! <origin>\n              the log's identity, non-empty
//! <tree size>\n           decimal, no leading zero (0 for the empty tree)
//! <base64 root hash>\n    the RFC 9162 root of that many leaves
//! [<extension line>\n]*   optional, non-empty, opaque
//! ```
//!
//! A checkpoint's fields mean nothing until its note is verified with the
//! log's key ([`SignedCheckpoint::verify`]). This module is pure: the
//! caller supplies keys, timestamps and proofs.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::merkle::{self, Hash, ProofError};
use crate::note::{
    KeyType, Note, NoteError, NoteSignature, SIGNATURE_LINE_BYTES_MAX, SIGNATURES_MAX, SignError,
    SignerKey, VerifierKey, VerifyError,
};

/// At most this many bytes in a checkpoint's text (as Go's sumdb bounds a
/// tree note); a longer one is refused unread.
pub const CHECKPOINT_BYTES_MAX: usize = 1_000_000;

/// A signed checkpoint: its text, the blank line, the most signature lines.
const SIGNED_CHECKPOINT_BYTES_MAX: usize =
    CHECKPOINT_BYTES_MAX + 1 + SIGNATURES_MAX * SIGNATURE_LINE_BYTES_MAX;

/// A log's tree head: origin, size and root, with optional extension lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    origin: String,
    size: u64,
    root: Hash,
    extensions: Vec<String>,
}

/// Why a text is not a checkpoint, or a signed checkpoint cannot be read
/// or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Longer than [`CHECKPOINT_BYTES_MAX`].
    #[error("the checkpoint has {bytes} bytes; at most {CHECKPOINT_BYTES_MAX} are accepted")]
    TooLarge {
        /// Its length.
        bytes: usize,
    },
    /// A line breaks the format (line numbers from 1).
    #[error("checkpoint line {line}: {reason}")]
    BadLine {
        /// The line's number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Fewer than three lines, or no final newline.
    #[error(
        "a checkpoint needs an origin, a tree size and a root hash, each on a line ending in a newline"
    )]
    TooShort,
    /// The signed note around it is malformed.
    #[error("the checkpoint's note is malformed: {0}")]
    Note(#[from] NoteError),
    /// A key could not sign it.
    #[error("cannot sign the checkpoint: {0}")]
    Sign(#[from] SignError),
}

fn bad(line: usize, reason: &'static str) -> CheckpointError {
    CheckpointError::BadLine { line, reason }
}

/// A line with nothing but printable text (no newline or control character).
fn check_line(line: &str, number: usize) -> Result<(), CheckpointError> {
    if line.is_empty() {
        return Err(bad(number, "it is empty"));
    }
    if line.chars().any(char::is_control) {
        return Err(bad(number, "it has a control character"));
    }
    Ok(())
}

impl Checkpoint {
    /// The checkpoint of a tree of `size` leaves with root `root`.
    ///
    /// # Errors
    /// [`CheckpointError::BadLine`] for an empty origin or one with a control
    /// character (a newline above all).
    pub fn new(origin: &str, size: u64, root: Hash) -> Result<Checkpoint, CheckpointError> {
        check_line(origin, 1)?;
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            extensions: Vec::new(),
        })
    }

    /// The same checkpoint with extension lines after the root.
    ///
    /// # Errors
    /// [`CheckpointError::BadLine`] for an empty line or one with a control
    /// character; [`CheckpointError::TooLarge`].
    pub fn with_extensions(mut self, lines: Vec<String>) -> Result<Checkpoint, CheckpointError> {
        for (i, line) in lines.iter().enumerate() {
            check_line(line, 4 + i)?;
        }
        self.extensions = lines;
        let bytes = self.to_string().len();
        if bytes > CHECKPOINT_BYTES_MAX {
            return Err(CheckpointError::TooLarge { bytes });
        }
        Ok(self)
    }

    /// Reads a checkpoint's text (a note's text, with its final newline).
    ///
    /// # Errors
    /// [`CheckpointError`] naming the first rule broken.
    pub fn parse(text: &str) -> Result<Checkpoint, CheckpointError> {
        if text.len() > CHECKPOINT_BYTES_MAX {
            return Err(CheckpointError::TooLarge { bytes: text.len() });
        }
        let body = text.strip_suffix('\n').ok_or(CheckpointError::TooShort)?;
        let lines: Vec<&str> = body.split('\n').collect();
        let [origin, size, root, extensions @ ..] = lines.as_slice() else {
            return Err(CheckpointError::TooShort);
        };
        for (i, line) in lines.iter().enumerate() {
            check_line(line, i + 1)?;
        }
        Ok(Checkpoint {
            origin: (*origin).to_string(),
            size: parse_size(size)?,
            root: parse_root(root)?,
            extensions: extensions.iter().map(|line| (*line).to_string()).collect(),
        })
    }

    /// The log's origin line.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tree's root hash.
    pub fn root(&self) -> &Hash {
        &self.root
    }

    /// The extension lines, without their newlines.
    pub fn extensions(&self) -> &[String] {
        &self.extensions
    }

    /// Checks that `newer` extends this checkpoint (same log, a tree that
    /// only grew), with `proof` the consistency proof between their sizes —
    /// what a witness checks before it cosigns, and what shows a rewrite.
    ///
    /// # Errors
    /// [`ConsistencyError`] naming what does not hold: another origin, a
    /// smaller tree, the same size with another root (a fork), or a proof
    /// that does not verify.
    pub fn check_extended_by(
        &self,
        newer: &Checkpoint,
        proof: &[Hash],
    ) -> Result<(), ConsistencyError> {
        if self.origin != newer.origin {
            return Err(ConsistencyError::OtherLog {
                old: self.origin.clone(),
                new: newer.origin.clone(),
            });
        }
        if newer.size < self.size {
            return Err(ConsistencyError::Shrunk {
                old_size: self.size,
                new_size: newer.size,
            });
        }
        if newer.size == self.size && newer.root != self.root {
            return Err(ConsistencyError::Fork { size: self.size });
        }
        if self.size == 0 {
            if self.root != merkle::empty_root() {
                return Err(ConsistencyError::BadEmptyRoot);
            }
            return match proof.len() {
                0 => Ok(()),
                got => Err(ConsistencyError::Proof(ProofError::WrongLength {
                    expected: 0,
                    got,
                })),
            };
        }
        merkle::verify_consistency(self.size, newer.size, &self.root, &newer.root, proof)
            .map_err(ConsistencyError::Proof)
    }
}

fn parse_size(line: &str) -> Result<u64, CheckpointError> {
    if !line.bytes().all(|b| b.is_ascii_digit()) || (line.len() > 1 && line.starts_with('0')) {
        return Err(bad(
            2,
            "the tree size must be a decimal number without leading zeros",
        ));
    }
    line.parse()
        .map_err(|_| bad(2, "the tree size does not fit in 64 bits"))
}

fn parse_root(line: &str) -> Result<Hash, CheckpointError> {
    let bytes = BASE64
        .decode(line)
        .map_err(|_| bad(3, "the root hash is not standard base64"))?;
    bytes
        .try_into()
        .map_err(|_| bad(3, "the root hash must be 32 bytes"))
}

impl fmt::Display for Checkpoint {
    /// The checkpoint's text, each line ending in a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.origin)?;
        writeln!(f, "{}", self.size)?;
        writeln!(f, "{}", BASE64.encode(self.root))?;
        for line in &self.extensions {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// Why a newer checkpoint does not extend an older one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsistencyError {
    /// The two are checkpoints of different logs.
    #[error("the checkpoints are of different logs: {old:?} and {new:?}")]
    OtherLog {
        /// The older checkpoint's origin.
        old: String,
        /// The newer one's.
        new: String,
    },
    /// The newer tree is smaller: the log lost entries.
    #[error("the log shrank from {old_size} to {new_size} entries")]
    Shrunk {
        /// The older size.
        old_size: u64,
        /// The newer size.
        new_size: u64,
    },
    /// Same size, different roots: two versions of the log exist.
    #[error("fork: two checkpoints of {size} entries with different roots")]
    Fork {
        /// The size both claim.
        size: u64,
    },
    /// An empty tree's checkpoint whose root is not the empty root.
    #[error("a checkpoint of the empty tree has a root other than SHA-256 of nothing")]
    BadEmptyRoot,
    /// The consistency proof does not verify.
    #[error("the newer checkpoint does not extend the older one: {0}")]
    Proof(ProofError),
}

/// A checkpoint with its signatures, as read or made; its fields are
/// unverified until [`SignedCheckpoint::verify`] succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCheckpoint {
    checkpoint: Checkpoint,
    note: Note,
}

/// A witness's verified cosignature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cosignature {
    /// The witness's key.
    pub witness: VerifierKey,
    /// When it cosigned (POSIX seconds), as it says.
    pub timestamp: u64,
}

/// A checkpoint whose log signature (and enough cosignatures) verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The log keys given whose signatures verified.
    pub log_signers: Vec<VerifierKey>,
    /// The cosignatures of the witnesses given that verified.
    pub cosignatures: Vec<Cosignature>,
    /// Signatures by keys not given (not checked).
    pub unknown: Vec<NoteSignature>,
}

/// Why a signed checkpoint is not established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointVerifyError {
    /// No log key given signed it (it may be signed by a key not given:
    /// not a sign of tampering by itself).
    #[error("unverifiable: no log key given signed this checkpoint (signed by {})", signers.join(", "))]
    Unverifiable {
        /// `NAME+KEYID` of each key that did sign.
        signers: Vec<String>,
    },
    /// A signature by a key given does not verify: the checkpoint or the
    /// signature was changed.
    #[error("{0}")]
    Invalid(VerifyError),
    /// Fewer witnesses given cosigned it than required.
    #[error("{have} of the witnesses given cosigned this checkpoint; {need} are required")]
    TooFewWitnesses {
        /// Witnesses whose cosignature verified.
        have: usize,
        /// Witnesses required.
        need: usize,
    },
    /// A log key given is not an Ed25519 signing (0x01) key.
    #[error("log key {0} is not an Ed25519 signing key (type 0x01)")]
    NotALogKey(String),
    /// A witness key given is not a cosigning (0x04) key.
    #[error("witness key {0} is not a cosigning key (type 0x04)")]
    NotAWitnessKey(String),
}

impl SignedCheckpoint {
    /// Signs `checkpoint` with the log's key (type 0x01).
    ///
    /// # Errors
    /// [`CheckpointError::Sign`] for a cosigning key;
    /// [`CheckpointError::TooLarge`].
    pub fn sign(
        checkpoint: Checkpoint,
        key: &SignerKey,
    ) -> Result<SignedCheckpoint, CheckpointError> {
        let text = checkpoint.to_string();
        if text.len() > CHECKPOINT_BYTES_MAX {
            return Err(CheckpointError::TooLarge { bytes: text.len() });
        }
        let mut note = Note::new(text)?;
        note.sign(key)?;
        Ok(SignedCheckpoint { checkpoint, note })
    }

    /// Reads a signed checkpoint (nothing verified yet).
    ///
    /// # Errors
    /// [`CheckpointError`] when the note or the checkpoint is malformed.
    pub fn parse(bytes: &[u8]) -> Result<SignedCheckpoint, CheckpointError> {
        if bytes.len() > SIGNED_CHECKPOINT_BYTES_MAX {
            return Err(CheckpointError::TooLarge { bytes: bytes.len() });
        }
        let note = Note::parse(bytes)?;
        let checkpoint = Checkpoint::parse(note.text())?;
        Ok(SignedCheckpoint { checkpoint, note })
    }

    /// The checkpoint, as it claims to be: not to be trusted before
    /// [`SignedCheckpoint::verify`] succeeds.
    pub fn unverified(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The note: the checkpoint's text and every signature line.
    pub fn note(&self) -> &Note {
        &self.note
    }

    /// Adds a witness's cosignature at `timestamp` (POSIX seconds). The
    /// caller first checks that this checkpoint extends the last one the
    /// witness cosigned ([`Checkpoint::check_extended_by`]).
    ///
    /// # Errors
    /// [`CheckpointError::Sign`] for a plain signing key or a timestamp past
    /// 2^63 − 1.
    pub fn cosign(&mut self, key: &SignerKey, timestamp: u64) -> Result<(), CheckpointError> {
        Ok(self.note.cosign(key, timestamp)?)
    }

    /// Adds a signature line made elsewhere (a witness's cosignature), in
    /// place of any by the same key. It is checked only by `verify`.
    ///
    /// # Errors
    /// [`CheckpointError::Sign`] when the note already has the most
    /// signatures allowed.
    pub fn add_signature(&mut self, signature: NoteSignature) -> Result<(), CheckpointError> {
        Ok(self.note.add_signature(signature)?)
    }

    /// Checks the log's signature (by one of `log_keys`) and the
    /// cosignatures of `witnesses`, of which at least `min_witnesses` must
    /// have cosigned. Signatures by keys not given are ignored.
    ///
    /// # Errors
    /// [`CheckpointVerifyError`]: unverifiable (no log key given signed),
    /// invalid (a given key's signature fails), too few witnesses.
    pub fn verify(
        &self,
        log_keys: &[VerifierKey],
        witnesses: &[VerifierKey],
        min_witnesses: usize,
    ) -> Result<VerifiedCheckpoint, CheckpointVerifyError> {
        if let Some(key) = log_keys.iter().find(|k| k.key_type() != KeyType::Ed25519) {
            return Err(CheckpointVerifyError::NotALogKey(key.to_string()));
        }
        if let Some(key) = witnesses
            .iter()
            .find(|k| k.key_type() != KeyType::Cosignature)
        {
            return Err(CheckpointVerifyError::NotAWitnessKey(key.to_string()));
        }
        let known: Vec<VerifierKey> = log_keys.iter().chain(witnesses).cloned().collect();
        let verification = self.note.verify(&known).map_err(|error| match error {
            VerifyError::Unverifiable { signers } => {
                CheckpointVerifyError::Unverifiable { signers }
            }
            other => CheckpointVerifyError::Invalid(other),
        })?;
        let mut log_signers = Vec::new();
        let mut cosignatures = Vec::new();
        for signed in verification.verified {
            match signed.timestamp {
                Some(timestamp) => cosignatures.push(Cosignature {
                    witness: signed.key,
                    timestamp,
                }),
                None => log_signers.push(signed.key),
            }
        }
        if log_signers.is_empty() {
            return Err(CheckpointVerifyError::Unverifiable {
                signers: self.note.signer_names(),
            });
        }
        if cosignatures.len() < min_witnesses {
            return Err(CheckpointVerifyError::TooFewWitnesses {
                have: cosignatures.len(),
                need: min_witnesses,
            });
        }
        Ok(VerifiedCheckpoint {
            checkpoint: self.checkpoint.clone(),
            log_signers,
            cosignatures,
            unknown: verification.unknown,
        })
    }
}

impl fmt::Display for SignedCheckpoint {
    /// The signed note's text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.note, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::MemoryTree;

    fn tree(size: u64) -> MemoryTree {
        let mut tree = MemoryTree::new();
        for i in 0..size {
            tree.push(&i.to_be_bytes());
        }
        tree
    }

    #[test]
    fn bodies_round_trip() {
        let cp = Checkpoint::new("example.com/log", 42, [7; 32])
            .unwrap()
            .with_extensions(vec!["ext one".into()])
            .unwrap();
        let text = cp.to_string();
        assert_eq!(
            text,
            "example.com/log\n42\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\next one\n"
        );
        assert_eq!(Checkpoint::parse(&text).unwrap(), cp);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let root = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
        let cases = [
            format!("log\n42\n{root}"),
            "log\n42\n".to_string(),
            format!("\n42\n{root}\n"),
            format!("log\n042\n{root}\n"),
            format!("log\n-1\n{root}\n"),
            format!("log\n+1\n{root}\n"),
            format!("log\n18446744073709551616\n{root}\n"),
            "log\n42\nYmFuYW5hcw==\n".to_string(),
            "log\n42\nnot base64!\n".to_string(),
            format!("log\n42\n{root}\n\n"),
            format!("log\n42\n{root}\next\n\n"),
            format!("lo\rg\n42\n{root}\n"),
        ];
        for case in cases {
            assert!(Checkpoint::parse(&case).is_err(), "{case:?}");
        }
        assert!(Checkpoint::parse(&format!("log\n0\n{root}\n")).is_ok());
        assert!(Checkpoint::new("two\nlines", 1, [0; 32]).is_err());
    }

    #[test]
    fn growth_forks_and_shrinking_are_told_apart() {
        let tree = tree(9);
        let at = |size| Checkpoint::new("log", size, merkle::root(size, &tree).unwrap()).unwrap();
        let proof = merkle::consistency_proof(5, 9, &tree).unwrap();
        assert_eq!(at(5).check_extended_by(&at(9), &proof), Ok(()));
        assert_eq!(at(9).check_extended_by(&at(9), &[]), Ok(()));
        assert_eq!(at(0).check_extended_by(&at(9), &[]), Ok(()));
        assert!(matches!(
            at(9).check_extended_by(&at(5), &proof),
            Err(ConsistencyError::Shrunk { .. })
        ));
        let forked = Checkpoint::new("log", 9, [1; 32]).unwrap();
        assert_eq!(
            at(9).check_extended_by(&forked, &[]),
            Err(ConsistencyError::Fork { size: 9 })
        );
        assert!(matches!(
            at(5).check_extended_by(&forked, &proof),
            Err(ConsistencyError::Proof(_))
        ));
        let other = Checkpoint::new("other", 9, *at(9).root()).unwrap();
        assert!(matches!(
            at(5).check_extended_by(&other, &proof),
            Err(ConsistencyError::OtherLog { .. })
        ));
    }

    #[test]
    fn verification_needs_the_log_key_and_enough_witnesses() {
        let log = SignerKey::from_seed("log", KeyType::Ed25519, &[1; 32]).unwrap();
        let witness = SignerKey::from_seed("w1", KeyType::Cosignature, &[2; 32]).unwrap();
        let cp = Checkpoint::new("log", 3, [5; 32]).unwrap();
        let mut signed = SignedCheckpoint::sign(cp, &log).unwrap();
        let log_key = [log.verifier_key().clone()];
        let witness_key = [witness.verifier_key().clone()];
        assert!(signed.verify(&log_key, &witness_key, 0).is_ok());
        assert!(matches!(
            signed.verify(&log_key, &witness_key, 1),
            Err(CheckpointVerifyError::TooFewWitnesses { have: 0, need: 1 })
        ));
        signed.cosign(&witness, 1_700_000_000).unwrap();
        let verified = signed.verify(&log_key, &witness_key, 1).unwrap();
        assert_eq!(verified.cosignatures[0].timestamp, 1_700_000_000);
        assert!(matches!(
            signed.verify(&[], &witness_key, 0),
            Err(CheckpointVerifyError::Unverifiable { .. })
        ));
        assert!(matches!(
            signed.verify(&witness_key, &[], 0),
            Err(CheckpointVerifyError::NotALogKey(_))
        ));
        assert!(matches!(
            signed.verify(&log_key, &log_key, 0),
            Err(CheckpointVerifyError::NotAWitnessKey(_))
        ));
        let reread = SignedCheckpoint::parse(signed.to_string().as_bytes()).unwrap();
        assert_eq!(reread, signed);
    }
}
