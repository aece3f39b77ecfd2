//! The transparency-log formats checked against code the crate did not
//! write: the published test vectors of RFC 9162 trees
//! (transparency-dev/merkle, draft-ietf-plants-merkle-tree-certs), of
//! signed notes (C2SP signed-note, golang.org/x/mod/sumdb/note,
//! transparency-dev/formats and transparency-dev/witness), and an
//! independent implementation in Python (`tests/interop/proofs.py`, with
//! the `cryptography` package) that checks what the crate makes and makes
//! what the crate checks. Property tests: every proof generated verifies and
//! any flipped bit fails it; the root read from stored subtrees is the
//! recursive definition's.
//!
//! The Python half needs `python3` (or `JE_PYTHON`) with `cryptography`;
//! without it the test says `SKIPPED`, and fails when `JE_REQUIRE_INTEROP=1`
//! or `CI` is set.

use std::io::Write as _;
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use job_executor::checkpoint::{Checkpoint, ConsistencyError, SignedCheckpoint};
use job_executor::merkle::{
    self, CompactRange, Hash, MemoryTree, Node, SubtreeSource, TreeError, leaf_hash, node_hash,
};
use job_executor::note::{
    KeyError, KeyId, KeyType, Note, NoteError, SignerKey, VerifierKey, VerifyError,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

fn unhex(text: &str) -> Vec<u8> {
    hex::decode(text).expect("test vector hex")
}

fn hash32(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

/// MTH of RFC 9162 §2.1.1, from its recursive definition.
fn reference_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => merkle::empty_root(),
        1 => leaves[0],
        n => {
            let k = 1usize << (n - 1).ilog2();
            node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
        }
    }
}

// ------------------------------------------------ transparency-dev/merkle

/// `testonly.LeafInputs()` of transparency-dev/merkle (testonly/constants.go).
const LEAF_INPUTS: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

/// `testonly.RootHashes()`: the roots of the first 0..=8 of those leaves.
const ROOT_HASHES: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// `testonly.NodeHashes()`: every complete subtree's hash, by level.
const NODE_HASHES: [&[&str]; 4] = [
    &[
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    &[
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    &[
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    &["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
];

#[test]
fn roots_and_subtrees_match_transparency_dev_merkle() {
    let mut tree = MemoryTree::new();
    assert_eq!(
        merkle::root(0, &tree).unwrap().to_vec(),
        unhex(ROOT_HASHES[0])
    );
    for (i, input) in LEAF_INPUTS.iter().enumerate() {
        tree.push(&unhex(input));
        assert_eq!(
            tree.root().to_vec(),
            unhex(ROOT_HASHES[i + 1]),
            "root of {}",
            i + 1
        );
    }
    for size in 0..=8u64 {
        let root = merkle::root(size, &tree).unwrap();
        assert_eq!(
            root.to_vec(),
            unhex(ROOT_HASHES[size as usize]),
            "root of {size}"
        );
    }
    for (level, hashes) in NODE_HASHES.iter().enumerate() {
        for (index, expected) in hashes.iter().enumerate() {
            let node = Node {
                level: level as u8,
                index: index as u64,
            };
            let got = tree.subtree_hashes(&[node]).unwrap();
            assert_eq!(got[0].to_vec(), unhex(expected), "{node}");
        }
    }
}

/// `testonly.CompactTrees()`: a compact range's peaks for 0..=8 leaves.
#[test]
fn compact_ranges_match_transparency_dev_merkle() {
    let node = |level: usize, index: usize| unhex(NODE_HASHES[level][index]);
    let expected: [Vec<Vec<u8>>; 9] = [
        vec![],
        vec![node(0, 0)],
        vec![node(1, 0)],
        vec![node(1, 0), node(0, 2)],
        vec![node(2, 0)],
        vec![node(2, 0), node(0, 4)],
        vec![node(2, 0), node(1, 2)],
        vec![node(2, 0), node(1, 2), node(0, 6)],
        vec![node(3, 0)],
    ];
    let mut range = CompactRange::new();
    for (i, peaks) in expected.iter().enumerate() {
        let got: Vec<Vec<u8>> = range.peaks().iter().map(|h| h.to_vec()).collect();
        assert_eq!(&got, peaks, "peaks of {i}");
        if let Some(input) = LEAF_INPUTS.get(i) {
            range.append(leaf_hash(&unhex(input)), |_, _| {});
        }
    }
}

/// One vector of transparency-dev/merkle's testdata, read from
/// `tests/fixtures/proofs/merkle-vectors.json`; `None` when a hash in it is
/// not 32 bytes (the verifier's types cannot even hold it).
struct Vector<'a> {
    value: &'a Value,
}

impl Vector<'_> {
    fn file(&self) -> &str {
        self.value["file"].as_str().unwrap_or("?")
    }

    fn want_err(&self) -> bool {
        self.value["wantErr"].as_bool().expect("wantErr")
    }

    fn number(&self, field: &str) -> u64 {
        self.value[field].as_u64().expect(field)
    }

    fn hash(&self, field: &str) -> Option<Hash> {
        hash32(
            &BASE64
                .decode(self.value[field].as_str().unwrap_or(""))
                .ok()?,
        )
    }

    fn proof(&self) -> Option<Vec<Hash>> {
        match &self.value["proof"] {
            Value::Null => Some(Vec::new()),
            Value::Array(items) => items
                .iter()
                .map(|item| hash32(&BASE64.decode(item.as_str()?).ok()?))
                .collect(),
            _ => None,
        }
    }
}

fn merkle_vectors() -> Value {
    let text = include_str!("../fixtures/proofs/merkle-vectors.json");
    serde_json::from_str(text).expect("merkle-vectors.json")
}

/// A vector whose roots are 12-byte placeholders ("don't care 2") yet
/// expects success: equal sizes, equal roots, empty proof. The verifier
/// takes 32-byte roots, so the case is checked with real ones instead.
const PLACEHOLDER_ROOTS: &str =
    "testdata/consistency/additional/sizes-are-equal-one-and-proof-is-empty.json";

#[test]
fn inclusion_vectors_of_transparency_dev_merkle() {
    let vectors = merkle_vectors();
    let list = vectors["inclusion"].as_array().expect("inclusion vectors");
    assert_eq!(list.len(), 98);
    for value in list {
        let v = Vector { value };
        let checked = (|| {
            let (leaf, root, proof) = (v.hash("leafHash")?, v.hash("root")?, v.proof()?);
            Some(merkle::verify_inclusion(
                &leaf,
                v.number("leafIdx"),
                v.number("treeSize"),
                &proof,
                &root,
            ))
        })();
        match checked {
            Some(result) => assert_eq!(result.is_err(), v.want_err(), "{}: {result:?}", v.file()),
            None => assert!(v.want_err(), "{}: a hash is not 32 bytes", v.file()),
        }
    }
}

#[test]
fn consistency_vectors_of_transparency_dev_merkle() {
    let vectors = merkle_vectors();
    let list = vectors["consistency"]
        .as_array()
        .expect("consistency vectors");
    assert_eq!(list.len(), 98);
    for value in list {
        let v = Vector { value };
        let checked = (|| {
            let (root1, root2, proof) = (v.hash("root1")?, v.hash("root2")?, v.proof()?);
            let (size1, size2) = (v.number("size1"), v.number("size2"));
            Some(merkle::verify_consistency(
                size1, size2, &root1, &root2, &proof,
            ))
        })();
        match checked {
            Some(result) => assert_eq!(result.is_err(), v.want_err(), "{}: {result:?}", v.file()),
            None if v.file() == PLACEHOLDER_ROOTS => {
                let root = [7; 32];
                assert_eq!(merkle::verify_consistency(1, 1, &root, &root, &[]), Ok(()));
            }
            None => assert!(v.want_err(), "{}: a hash is not 32 bytes", v.file()),
        }
    }
}

/// The "Subtree Test Vectors" of draft-ietf-plants-merkle-tree-certs (as
/// transparency-dev/merkle's testonly/vectors_test.go reproduces them): over
/// the leaves 0x00, 0x01, …, 0x81, every subtree `[start, end)` with
/// `end` ≤ 130, written `[start, end) <hex hash>\n`, folded into one SHA-256.
#[test]
fn subtree_hashes_match_the_mtc_draft_vector() {
    let mut tree = MemoryTree::new();
    for i in 0..130u8 {
        tree.push(&[i]);
    }
    let mut rolling = Sha256::new();
    let mut count = 0;
    for end in 0..=130u64 {
        for start in 0..=end {
            match merkle::subtree_root(start, end, &tree) {
                Ok(hash) => {
                    rolling.update(format!("[{start}, {end}) {}\n", hex::encode(hash)));
                    count += 1;
                }
                Err(TreeError::NotASubtree { .. }) => {}
                Err(e) => panic!("[{start}, {end}): {e}"),
            }
        }
    }
    assert!(count > 130);
    assert_eq!(
        hex::encode(rolling.finalize()),
        "b82806ad4265bb151c1119c0f4db437bb4d1a1f887b3a7fba1cd4ebf552e3e81"
    );
}

// ------------------------------------------------ C2SP and Go signed notes

/// The example of C2SP signed-note ("Verifier keys", "Example").
#[test]
fn the_c2sp_signed_note_example_verifies() {
    let vkey =
        VerifierKey::parse("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k")
            .unwrap();
    let text = "This is an example message.\n\n— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
    let note = Note::parse(text.as_bytes()).unwrap();
    assert_eq!(note.text(), "This is an example message.\n");
    let verified = note.verify(&[vkey]).unwrap();
    assert_eq!(verified.verified.len(), 1);
    assert_eq!(note.to_string(), text);
}

// golang.org/x/mod/sumdb/note: note_test.go and the package documentation.
const PETER_SKEY: &str =
    "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
const PETER_SIG: &str = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
const ENOCH_SIG: &str = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

#[test]
fn go_keys_are_read_and_their_manglings_refused() {
    let signer = SignerKey::parse(PETER_SKEY).unwrap();
    assert_eq!(signer.verifier_key().to_string(), PETER_VKEY);
    assert_eq!(signer.verifier_key().id(), KeyId(0xc74f20a3));
    assert_eq!(signer.to_private_text(), PETER_SKEY);
    assert_eq!(
        VerifierKey::parse(PETER_VKEY).unwrap().to_string(),
        PETER_VKEY
    );
    for text in [PETER_VKEY, PETER_SKEY] {
        let bytes = text.as_bytes();
        let parses = |s: &str| {
            if text == PETER_VKEY {
                VerifierKey::parse(s).is_ok()
            } else {
                SignerKey::parse(s).is_ok()
            }
        };
        for i in 0..=bytes.len() {
            for j in i + 1..=bytes.len() {
                if (i, j) != (0, bytes.len()) {
                    let part = String::from_utf8_lossy(&bytes[i..j]);
                    assert!(!parses(&part), "{part:?} was accepted");
                }
            }
        }
        for i in 0..bytes.len() {
            let mut changed = bytes.to_vec();
            changed[i] += 1;
            let changed = String::from_utf8_lossy(&changed);
            assert!(!parses(&changed), "{changed:?} was accepted");
        }
    }
    // A wrong-length key and an unknown algorithm, each with its key hash adjusted.
    assert!(
        VerifierKey::parse(
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=="
        )
        .is_err()
    );
    assert!(matches!(
        VerifierKey::parse("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"),
        Err(KeyError::UnsupportedType(0x65))
    ));
}

#[test]
fn go_notes_sign_and_open_as_go_does() {
    let signer = SignerKey::parse(PETER_SKEY).unwrap();
    let mut note = Note::new(GO_TEXT).unwrap();
    note.sign(&signer).unwrap();
    assert_eq!(note.to_string(), format!("{GO_TEXT}\n{PETER_SIG}"));

    let peter = VerifierKey::parse(PETER_VKEY).unwrap();
    let enoch = VerifierKey::parse(ENOCH_VKEY).unwrap();
    let both = Note::parse(format!("{GO_TEXT}\n{PETER_SIG}{ENOCH_SIG}").as_bytes()).unwrap();
    let one = both.verify(std::slice::from_ref(&peter)).unwrap();
    assert_eq!((one.verified.len(), one.unknown.len()), (1, 1));
    assert_eq!(one.unknown[0].name(), "EnochRoot");
    let two = both.verify(&[peter.clone(), enoch.clone()]).unwrap();
    assert_eq!((two.verified.len(), two.unknown.len()), (2, 0));
    assert_eq!(
        both.verify(&[]),
        Err(VerifyError::Unverifiable {
            signers: vec!["PeterNeumann+c74f20a3".into(), "EnochRoot+af0cfe78".into()]
        })
    );
    // A signature changed in its middle: the known key's check fails.
    let forged = format!("{GO_TEXT}\n{}ABCD{}", &PETER_SIG[..60], &PETER_SIG[60..]);
    assert_eq!(
        Note::parse(forged.as_bytes())
            .unwrap()
            .verify(std::slice::from_ref(&peter)),
        Err(VerifyError::Invalid {
            name: "PeterNeumann".into(),
            key_id: KeyId(0xc74f20a3)
        })
    );
    // Repeated lines, and an unknown key's changed signature kept unchecked.
    let enoch_changed = format!("{}ABCD{}", &ENOCH_SIG[..60], &ENOCH_SIG[60..]);
    let repeated =
        format!("{GO_TEXT}\n{PETER_SIG}{PETER_SIG}{ENOCH_SIG}{ENOCH_SIG}{enoch_changed}");
    let opened = Note::parse(repeated.as_bytes())
        .unwrap()
        .verify(&[peter])
        .unwrap();
    assert_eq!((opened.verified.len(), opened.unknown.len()), (1, 2));
}

#[test]
fn malformed_go_notes_are_refused() {
    let too_many = format!("{GO_TEXT}\n{}", PETER_SIG.repeat(101));
    assert_eq!(
        Note::parse(too_many.as_bytes()),
        Err(NoteError::TooManySignatures)
    );
    let hundred = format!("{GO_TEXT}\n{}", PETER_SIG.repeat(100));
    assert!(Note::parse(hundred.as_bytes()).is_ok());
    let bad = [
        GO_TEXT.to_string(),
        format!("{GO_TEXT}\n"),
        format!("{GO_TEXT}\n{}", &PETER_SIG[..PETER_SIG.len() - 1]),
        format!("\x01{GO_TEXT}\n{PETER_SIG}"),
        format!(
            "{GO_TEXT}\n— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
        ),
        format!("{GO_TEXT}\n{PETER_SIG}Unexpected line.\n"),
    ];
    for text in bad {
        assert!(Note::parse(text.as_bytes()).is_err(), "{text:?}");
    }
    let mut not_utf8 = b"\xff".to_vec();
    not_utf8.extend_from_slice(format!("{GO_TEXT}\n{PETER_SIG}").as_bytes());
    assert_eq!(Note::parse(&not_utf8), Err(NoteError::NotUtf8));
}

/// Key pairs of transparency-dev/formats (log/note_test.go) and
/// transparency-dev/witness (witness/witness_test.go), made by Go's
/// `note.GenerateKey`: each private key gives its verifier key.
#[test]
fn go_generated_key_pairs_agree() {
    let pairs = [
        (
            "PRIVATE+KEY+Log+2271c621+AdEIq9FLRQni54Wg68T96VJO+iayOaulswav2DUMKgvQ",
            "Log+2271c621+AemuH5ooBpEPcr+W8onrjA1NfuzBVHdezakU81Ekarvs",
        ),
        (
            "PRIVATE+KEY+Known+451c786d+AQPRoE2+Z+Ed1HaHBA9F/FfracvcZ2rDU39kCecMEoci",
            "Known+451c786d+AXAQ0T7lbwuY4ABJ9/MYY9bWV3hmSyOGVt2x42NkmdUH",
        ),
        (
            "PRIVATE+KEY+KnownAgain+4893b26c+ARhZda/l25zjGZswYLDZsLNRzNpmv5wYTN9IoTr1OJ2+",
            "KnownAgain+4893b26c+AQ+LR7BFF/F/dkpIBjBpSvT0crkteizuUkavAoGeaYMj",
        ),
        (
            "PRIVATE+KEY+Unknown+fdbb2e08+Aav2knTC6orbhXX8pMWuNiWgO+Wwk2DB+h1eU2Q1W1nU",
            "Unknown+fdbb2e08+AWgRIYZ+8x1Vl+1Q+sR8zciNHiYI1SdlBjNw+RV0rots",
        ),
        (
            "PRIVATE+KEY+Wit1+55ee4561+AeadRiG7XM4XiieCHzD8lxysXMwcViy5nYsoXURWGrlE",
            "Wit1+55ee4561+AVhZSmQj9+SoL+p/nN0Hh76xXmF7QcHfytUrI1XfSClk",
        ),
        (
            "PRIVATE+KEY+Wit2+85ecc407+AfPTvxw5eUcqSgivo2vaiC7JPOMUZ/9baHPSDrWqgdGm",
            "Wit2+85ecc407+AWVbwFJte9wMQIPSnEnj4KibeO6vSIOEDUTDp3o63c2x",
        ),
        (
            "PRIVATE+KEY+witness+f13a86db+AaLa/dfyBhyo/m0Z7WCi98ENVZWtrP8pxgRNrx7tIWiA",
            "witness+f13a86db+AdYV1Ztajd9BvyjP2HgpwrqYL6TjOwIjGMOq8Bu42xbN",
        ),
    ];
    for (private, public) in pairs {
        let key = SignerKey::parse(private).unwrap();
        assert_eq!(key.verifier_key().to_string(), public);
        assert_eq!(key.to_private_text(), private);
    }
}

/// Verifier keys from transparency-dev/formats note/note_cosigv1_test.go and
/// note_verifier_test.go: a witness's real cosigning key (type 0x04) is read
/// and its key id checked; other types and broken keys are refused.
#[test]
fn published_verifier_keys_are_read_or_refused() {
    let remora =
        VerifierKey::parse("remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2")
            .unwrap();
    assert_eq!(remora.key_type(), KeyType::Cosignature);
    let test =
        VerifierKey::parse("TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6").unwrap();
    assert_eq!(test.key_type(), KeyType::Ed25519);
    let as_cosigner = VerifierKey::new("TEST", KeyType::Cosignature, &test.public_key()).unwrap();
    assert_ne!(
        as_cosigner.id(),
        test.id(),
        "the type byte is part of the key id"
    );
    let ecdsa = "rekor.sigstore.dev+c0d23d6a+AjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNhtmPtrWm3U1eQXBogSMdGvXwBcK5AW5i0hrZLOC96l+smGNM7nwZ4QvFK/4sueRoVj//QP22Ni4Qt9DPfkWLc=";
    assert!(matches!(
        VerifierKey::parse(ecdsa),
        Err(KeyError::UnsupportedType(0x02))
    ));
    for bad in [
        "bananas.sigstore.dev+12344556",
        "rekor.sigstore.dev+12345678+THIS_IS_NOT_BASE64!",
        "rekor.sigstore.dev+12345678+AwEB",
        "rekor.sigstore.dev+NOT_A_NUMBER+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6",
        "TEST+00000000+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6",
    ] {
        assert!(VerifierKey::parse(bad).is_err(), "{bad}");
    }
}

/// Real checkpoints signed with ECDSA (type 0x02) by Rekor and the Pixel
/// transparency log (transparency-dev/formats note_verifier_test.go): the
/// notes and bodies are read; with no key for them they are unverifiable.
#[test]
fn ecdsa_signed_checkpoints_are_read_and_unverifiable() {
    let rekor = "Rekor\n798034\nf+7CoKgXKE/tNys9TTXcr/ad6U/K3xvznmzew9y6SP0=\n\n— rekor.sigstore.dev wNI9ajBEAiARInWIWyCdyG27CO6LPnPekyw20qO0YJfoaPaowGp/XgIgc+qEHS3+GKVClgqq20uDLet7MCoTURUCRdxwWBHHufk=\n";
    let pixel = "DEFAULT\n10\nbsWRucJU5xJPHb5eBdOm6+DM+VelCZBuvtI3sHERJ9Y=\n\n— pixel6_transparency_log kcFuMDBFAiEAhqMAP8P6qf6QxtUJhzMhbN+MbZ9dwfUHzGQJmffJHtoCIGD0cNe47dHWBoPwYdgBCepB06/+g5O1FmYjXl06owL4\n";
    for (text, origin, size, signer) in [
        (rekor, "Rekor", 798034, "rekor.sigstore.dev+c0d23d6a"),
        (pixel, "DEFAULT", 10, "pixel6_transparency_log+91c16e30"),
    ] {
        let signed = SignedCheckpoint::parse(text.as_bytes()).unwrap();
        assert_eq!(signed.unverified().origin(), origin);
        assert_eq!(signed.unverified().size(), size);
        assert_eq!(signed.to_string(), text);
        let error = signed.verify(&[], &[], 0).unwrap_err().to_string();
        assert!(
            error.starts_with("unverifiable") && error.contains(signer),
            "{error}"
        );
    }
}

/// The example of C2SP tlog-cosignature: a checkpoint signed by its log and
/// cosigned by a witness at 1679315147 (the time of the spec's signed message).
#[test]
fn the_c2sp_cosigned_checkpoint_is_read() {
    let text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n";
    let signed = SignedCheckpoint::parse(text.as_bytes()).unwrap();
    assert_eq!(signed.unverified().origin(), "example.com/behind-the-sofa");
    assert_eq!(signed.unverified().size(), 20852163);
    let lines = signed.note().signatures();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].claimed_timestamp(), None);
    assert_eq!(lines[1].claimed_timestamp(), Some(1679315147));
    assert_eq!(signed.to_string(), text);
}

/// transparency-dev/witness witness/witness_test.go: a log's signed
/// checkpoints of 5 and 8 leaves and the consistency proof between them.
#[test]
fn witness_test_checkpoints_are_consistent() {
    let log = VerifierKey::parse("monkeys+db4d9f7e+AULaJMvTtDLHPUcUrjdDad9vDlh/PTfC2VV60JUtCfWT")
        .unwrap();
    let init = "monkeys\n5\n41smjBUiAU70EtKlT6lIOIYtRTYxYXsDB+XHfcvu/BE=\n\n— monkeys 202fftzGl3LVoqjXfwCFZZXs8I+5G22+Ek2K0AOyBuSJ/8/CZawNF+6fNlTKOCd622pbzJNkkJFWuw9DbicZCkEx9AY=\n";
    let next = "monkeys\n8\nV8K9aklZ4EPB+RMOk1/8VsJUdFZR77GDtZUQq84vSbo=\n\n— monkeys 202ffoUEboiQYpHzICeaFmoy3RNviHTpAxYrq/eO4QQVQMvu9UebKBMX2MJC76NLthZaKsnKbCA8GxrjePZhvDCH7Ag=\n";
    let proof: Vec<Hash> = [
        "b9e1d62618f7fee8034e4c5010f727ab24d8e4705cb296c374bf2025a87a10d2",
        "aac66cd7a79ce4012d80762fe8eec3a77f22d1ca4145c3f4cee022e7efcd599d",
        "89d0f753f66a290c483b39cd5e9eafb12021293395fad3d4a2ad053cfbcfdc9e",
        "29e40bb79c966f4c6fe96aff6f30acfce5f3e8d84c02215175d6e018a5dee833",
    ]
    .iter()
    .map(|h| hash32(&unhex(h)).unwrap())
    .collect();
    let old = SignedCheckpoint::parse(init.as_bytes()).unwrap();
    let new = SignedCheckpoint::parse(next.as_bytes()).unwrap();
    let old = old
        .verify(std::slice::from_ref(&log), &[], 0)
        .unwrap()
        .checkpoint;
    let new = new
        .verify(std::slice::from_ref(&log), &[], 0)
        .unwrap()
        .checkpoint;
    assert_eq!(old.check_extended_by(&new, &proof), Ok(()));
    let mut bent = proof.clone();
    bent[2][0] ^= 1;
    assert!(matches!(
        old.check_extended_by(&new, &bent),
        Err(ConsistencyError::Proof(_))
    ));
}

// ---------------------------------------------------------- properties

fn tree_of(size: u64, salt: u64) -> (MemoryTree, Vec<Hash>) {
    let mut tree = MemoryTree::new();
    let mut leaves = Vec::new();
    for i in 0..size {
        let data: Hash = Sha256::digest([salt.to_be_bytes(), i.to_be_bytes()].concat()).into();
        let leaf = leaf_hash(&data);
        tree.push_leaf_hash(leaf);
        leaves.push(leaf);
    }
    (tree, leaves)
}

fn flip(hash: &mut Hash, bit: usize) {
    hash[bit / 8 % 32] ^= 1 << (bit % 8);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn roots_from_stored_subtrees_are_the_recursive_roots(size in 0u64..300, salt: u64) {
        let (tree, leaves) = tree_of(size, salt);
        for n in [0, size / 3, size / 2, size.saturating_sub(1), size] {
            prop_assert_eq!(merkle::root(n, &tree).unwrap(), reference_root(&leaves[..n as usize]));
        }
        let loaded = CompactRange::load(size, &tree).unwrap();
        prop_assert_eq!(loaded.root(), reference_root(&leaves));
    }

    #[test]
    fn inclusion_proofs_verify_and_any_flipped_bit_fails(
        size in 1u64..300, index_seed: u64, salt: u64, pick: usize, bit in 0usize..256,
    ) {
        let (tree, leaves) = tree_of(size, salt);
        let index = index_seed % size;
        let root = merkle::root(size, &tree).unwrap();
        let proof = merkle::inclusion_proof(index, size, &tree).unwrap();
        let leaf = leaves[index as usize];
        prop_assert_eq!(merkle::verify_inclusion(&leaf, index, size, &proof, &root), Ok(()));
        let mut bad_leaf = leaf;
        flip(&mut bad_leaf, bit);
        prop_assert!(merkle::verify_inclusion(&bad_leaf, index, size, &proof, &root).is_err());
        let mut bad_root = root;
        flip(&mut bad_root, bit);
        prop_assert!(merkle::verify_inclusion(&leaf, index, size, &proof, &bad_root).is_err());
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let at = pick % bad.len();
            flip(&mut bad[at], bit);
            prop_assert!(merkle::verify_inclusion(&leaf, index, size, &bad, &root).is_err());
        }
    }

    #[test]
    fn consistency_proofs_verify_and_any_flipped_bit_fails(
        size in 1u64..300, old_seed: u64, salt: u64, pick: usize, bit in 0usize..256,
    ) {
        let (tree, _) = tree_of(size, salt);
        let old = 1 + old_seed % size;
        let (old_root, new_root) = (merkle::root(old, &tree).unwrap(), merkle::root(size, &tree).unwrap());
        let proof = merkle::consistency_proof(old, size, &tree).unwrap();
        prop_assert_eq!(merkle::verify_consistency(old, size, &old_root, &new_root, &proof), Ok(()));
        let mut bad_old = old_root;
        flip(&mut bad_old, bit);
        prop_assert!(merkle::verify_consistency(old, size, &bad_old, &new_root, &proof).is_err());
        let mut bad_new = new_root;
        flip(&mut bad_new, bit);
        prop_assert!(merkle::verify_consistency(old, size, &old_root, &bad_new, &proof).is_err());
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let at = pick % bad.len();
            flip(&mut bad[at], bit);
            prop_assert!(merkle::verify_consistency(old, size, &old_root, &new_root, &bad).is_err());
        }
    }

    #[test]
    fn a_flipped_bit_in_a_signed_checkpoint_never_verifies(size: u64, seed: [u8; 32], bit: usize) {
        let key = SignerKey::from_seed("example.com/log", KeyType::Ed25519, &seed).unwrap();
        let checkpoint = Checkpoint::new("example.com/log", size, Sha256::digest(seed).into()).unwrap();
        let signed = SignedCheckpoint::sign(checkpoint, &key).unwrap();
        let mut bytes = signed.to_string().into_bytes();
        let at = bit % (bytes.len() * 8);
        bytes[at / 8] ^= 1 << (at % 8);
        if let Ok(changed) = SignedCheckpoint::parse(&bytes) {
            prop_assert!(changed.verify(&[key.verifier_key().clone()], &[], 0).is_err());
        }
    }
}

// ----------------------------------------------------- Python interop

fn interop_required() -> bool {
    std::env::var("JE_REQUIRE_INTEROP").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The Python to run, or `None` (and `SKIPPED` printed) when it lacks
/// `cryptography` and the interop test is not required.
fn python() -> Option<String> {
    let python = std::env::var("JE_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import cryptography"])
        .output();
    match probe {
        Ok(out) if out.status.success() => Some(python),
        other => {
            let why = match other {
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(
                !interop_required(),
                "JE_REQUIRE_INTEROP=1 or CI, but {python} cannot import cryptography: {why}"
            );
            eprintln!(
                "SKIPPED: python_interop: {python} cannot import cryptography ({why}); `pip install cryptography` or set JE_PYTHON to run it (JE_REQUIRE_INTEROP=1 makes this a failure)"
            );
            None
        }
    }
}

fn b64_list(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(|h| BASE64.encode(h)).collect()
}

/// What the crate makes for Python to check: keys, a note, a cosigned
/// checkpoint, and every root and proof of a tree of 37 leaves.
fn rust_artifacts(seed: u64, timestamp: u64) -> Value {
    let signer = SignerKey::generate("rust.example/log", KeyType::Ed25519).unwrap();
    let witness = SignerKey::generate("rust.example/witness", KeyType::Cosignature).unwrap();
    let mut note =
        Note::new("A note from Rust,\n\nwith a blank line and a second line.\n").unwrap();
    note.sign(&signer).unwrap();
    let mut tree = MemoryTree::new();
    let mut leaves = Vec::new();
    for i in 0..37u64 {
        let data: Hash = Sha256::digest([seed.to_be_bytes(), i.to_be_bytes()].concat()).into();
        tree.push(&data);
        leaves.push(hex::encode(data));
    }
    let checkpoint = Checkpoint::new("rust.example/log", 37, tree.root()).unwrap();
    let mut signed = SignedCheckpoint::sign(checkpoint, &signer).unwrap();
    signed.cosign(&witness, timestamp).unwrap();
    let roots: Vec<String> = (0..=37)
        .map(|n| BASE64.encode(merkle::root(n, &tree).unwrap()))
        .collect();
    let mut inclusion = Vec::new();
    let mut consistency = Vec::new();
    for size in 1..=37u64 {
        for index in 0..size {
            let proof = merkle::inclusion_proof(index, size, &tree).unwrap();
            inclusion.push(json!({"index": index, "size": size, "proof": b64_list(&proof)}));
        }
        for old in 1..=size {
            let proof = merkle::consistency_proof(old, size, &tree).unwrap();
            consistency.push(json!({"old": old, "new": size, "proof": b64_list(&proof)}));
        }
    }
    json!({
        "signer_private": signer.to_private_text(),
        "signer_verifier": signer.verifier_key().to_string(),
        "witness_private": witness.to_private_text(),
        "witness_verifier": witness.verifier_key().to_string(),
        "note": note.to_string(),
        "origin": "rust.example/log",
        "checkpoint": signed.to_string(),
        "cosign_timestamp": timestamp,
        "leaves": leaves, "roots": roots, "inclusion": inclusion, "consistency": consistency,
    })
}

fn run_python(python: &str, request: &Value) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/proofs.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write to python");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "proofs.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("proofs.py prints JSON")
}

fn hashes(value: &Value) -> Vec<Hash> {
    value
        .as_array()
        .expect("a proof")
        .iter()
        .map(|h| {
            hash32(&BASE64.decode(h.as_str().expect("base64")).expect("base64")).expect("32 bytes")
        })
        .collect()
}

/// Checks what Python made: its keys read as the same keys, its note and
/// cosigned checkpoint verify, and its proofs are the crate's proofs.
fn check_python_artifacts(made: &Value) {
    let text = |field: &str| made[field].as_str().expect(field).to_string();
    let signer = SignerKey::parse(&text("signer_private")).unwrap();
    let log_key = VerifierKey::parse(&text("signer_verifier")).unwrap();
    assert_eq!(signer.verifier_key(), &log_key);
    let witness = SignerKey::parse(&text("witness_private")).unwrap();
    let witness_key = VerifierKey::parse(&text("witness_verifier")).unwrap();
    assert_eq!(witness.verifier_key(), &witness_key);
    assert_eq!(witness_key.key_type(), KeyType::Cosignature);

    let note = Note::parse(text("note").as_bytes()).unwrap();
    assert_eq!(note.text(), text("note_text"));
    note.verify(std::slice::from_ref(&log_key)).unwrap();
    let mut resigned = Note::new(text("note_text")).unwrap();
    resigned.sign(&signer).unwrap();
    assert_eq!(
        resigned.to_string(),
        text("note"),
        "Ed25519 is deterministic: same bytes"
    );

    let mut tree = MemoryTree::new();
    for leaf in made["leaves"].as_array().expect("leaves") {
        tree.push(&unhex(leaf.as_str().expect("hex")));
    }
    let signed = SignedCheckpoint::parse(text("checkpoint").as_bytes()).unwrap();
    let verified = signed.verify(&[log_key], &[witness_key], 1).unwrap();
    assert_eq!(verified.checkpoint.size(), tree.size());
    assert_eq!(verified.checkpoint.root(), &tree.root());
    assert_eq!(
        Some(verified.cosignatures[0].timestamp),
        made["cosign_timestamp"].as_u64()
    );

    for p in made["inclusion"].as_array().expect("inclusion") {
        let (index, size) = (p["index"].as_u64().unwrap(), p["size"].as_u64().unwrap());
        assert_eq!(
            hashes(&p["proof"]),
            merkle::inclusion_proof(index, size, &tree).unwrap()
        );
    }
    for p in made["consistency"].as_array().expect("consistency") {
        let (old, new) = (p["old"].as_u64().unwrap(), p["new"].as_u64().unwrap());
        assert_eq!(
            hashes(&p["proof"]),
            merkle::consistency_proof(old, new, &tree).unwrap()
        );
    }
}

#[test]
fn python_interop() {
    let Some(python) = python() else { return };
    let seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let timestamp = 1_700_000_000 + seed % 100_000_000;
    eprintln!("python_interop: seed {seed}");
    let mut python_seed = [0u8; 32];
    python_seed[..8].copy_from_slice(&seed.to_be_bytes());
    let request = json!({
        "rust": rust_artifacts(seed, timestamp),
        "seed": hex::encode(python_seed),
        "timestamp": timestamp,
    });
    let answer = run_python(&python, &request);
    let checks = answer["checks"].as_object().expect("checks");
    assert!(checks.len() >= 9, "{checks:?}");
    for (name, verdict) in checks {
        assert_eq!(
            verdict, "ok",
            "Python's check {name:?} of the crate's output (seed {seed})"
        );
    }
    check_python_artifacts(&answer["made"]);
}
