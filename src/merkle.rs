//! The Merkle tree of RFC 9162 §2.1 over the whole log: hashing, roots,
//! inclusion and consistency proofs (generated and verified), and the
//! compact range that says which subtree hashes an append completes.
//!
//! ```text
//! leaf hash = SHA-256( 0x00 || leaf data )          leaf data: the event's 32-byte chain digest
//! node hash = SHA-256( 0x01 || left || right )
//! MTH({})   = SHA-256()                              the empty tree
//! ```
//!
//! Leaf index `n` is the event at global position `n + 1`. Proofs are built
//! from the hashes of *complete subtrees* ([`Node`]: the `2^level` leaves
//! from `index · 2^level`), which a [`SubtreeSource`] answers — a store keeps
//! one row per complete subtree, so a root or a proof reads O(log n) rows and
//! never the log. [`CompactRange::append`] names the subtrees each new leaf
//! completes (what a store writes per append); [`MemoryTree`] is the
//! in-memory source.
//!
//! This module is pure: no I/O, no clock; it knows nothing of events.

use std::fmt;
use std::ops::Range;

use sha2::{Digest as _, Sha256};

/// A SHA-256 hash: a leaf, a node or a root.
pub type Hash = [u8; 32];

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// The leaf hash of `data` (for the log: an event's 32-byte chain digest).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(data);
    hasher.finalize().into()
}

/// The hash of an interior node from its children's hashes.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The root of the empty tree: SHA-256 of no bytes.
pub fn empty_root() -> Hash {
    Sha256::new().finalize().into()
}

/// A complete subtree: the `2^level` leaves starting at `index · 2^level`.
/// Level 0 is a single leaf (its hash is the leaf hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    /// Height above the leaves: the subtree covers `2^level` leaves.
    pub level: u8,
    /// Position among the subtrees of its level, from the left.
    pub index: u64,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subtree {} at level {}", self.index, self.level)
    }
}

/// Where the hashes of complete subtrees come from (a store's rows, or
/// [`MemoryTree`]). Proofs and roots ask for every hash they need in one call.
pub trait SubtreeSource {
    /// Why the hashes could not be read.
    type Error;

    /// The hash of each complete subtree in `nodes`, in the same order.
    ///
    /// # Errors
    /// When a hash cannot be read (or the source does not hold it).
    fn subtree_hashes(&self, nodes: &[Node]) -> Result<Vec<Hash>, Self::Error>;
}

/// Why a root or proof could not be generated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError<E> {
    /// The leaf asked for is not in the tree.
    #[error("leaf index {index} is not in a tree of {size} leaves")]
    LeafOutOfRange {
        /// The leaf index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// A consistency proof was asked between sizes that have none.
    #[error(
        "no consistency proof from tree size {old_size} to {new_size}: the old size must be at least 1 and at most the new size"
    )]
    BadSizes {
        /// The older tree's size.
        old_size: u64,
        /// The newer tree's size.
        new_size: u64,
    },
    /// A range of leaves that is not a subtree RFC 9162's tree contains.
    #[error("leaves {start}..{end} are not a subtree of the log's tree")]
    NotASubtree {
        /// First leaf.
        start: u64,
        /// One past the last leaf.
        end: u64,
    },
    /// The source answered with a different number of hashes than asked.
    #[error("the tree's hash source answered {got} hashes for {asked} subtrees")]
    ShortAnswer {
        /// Hashes asked for.
        asked: usize,
        /// Hashes answered.
        got: usize,
    },
    /// The source could not read the hashes.
    #[error("cannot read the tree's subtree hashes: {source}")]
    Source {
        /// The source's error.
        source: E,
    },
}

/// Appends to `out` the complete subtrees that make up leaves
/// `start..end`, left to right: at each step the largest subtree that starts
/// there and fits. For the ranges RFC 9162's recursion splits a tree into
/// (`start` a multiple of the smallest power of two ≥ `end - start`), the
/// range's hash is these subtrees' hashes folded from the right.
fn push_range_nodes(start: u64, end: u64, out: &mut Vec<Node>) {
    let mut start = start;
    while start < end {
        let mut level = (end - start).ilog2();
        if start != 0 {
            level = level.min(start.trailing_zeros());
        }
        out.push(Node {
            level: level as u8,
            index: start >> level,
        });
        start += 1u64 << level;
    }
}

/// Folds a range's subtree hashes from the right: `h0 · (h1 · (h2 · …))`.
fn fold_right(hashes: &[Hash]) -> Hash {
    match hashes.split_last() {
        None => empty_root(),
        Some((last, rest)) => rest
            .iter()
            .rev()
            .fold(*last, |right, left| node_hash(left, &right)),
    }
}

/// The largest power of two strictly below `n` (`n` ≥ 2): where RFC 9162
/// splits a tree of `n` leaves.
fn split_point(n: u64) -> u64 {
    1u64 << (n - 1).ilog2()
}

/// The leaf ranges whose hashes make up the inclusion proof of `index` in a
/// tree of `size` leaves (RFC 9162 §2.1.3.1, PATH), from the leaf upwards.
fn inclusion_ranges(index: u64, size: u64) -> Vec<(u64, u64)> {
    let (mut lo, mut hi) = (0, size);
    let mut ranges = Vec::new();
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if index < lo + k {
            ranges.push((lo + k, hi));
            hi = lo + k;
        } else {
            ranges.push((lo, lo + k));
            lo += k;
        }
    }
    ranges.reverse();
    ranges
}

/// The leaf ranges whose hashes make up the consistency proof from
/// `old_size` to `new_size` leaves (RFC 9162 §2.1.4.1, SUBPROOF), bottom
/// first; `0 < old_size <= new_size`.
fn consistency_ranges(old_size: u64, new_size: u64) -> Vec<(u64, u64)> {
    let (mut lo, mut hi) = (0, new_size);
    let mut whole_old_tree = true;
    let mut ranges = Vec::new();
    while old_size != hi {
        let k = split_point(hi - lo);
        if old_size - lo <= k {
            ranges.push((lo + k, hi));
            hi = lo + k;
        } else {
            ranges.push((lo, lo + k));
            lo += k;
            whole_old_tree = false;
        }
    }
    if !whole_old_tree {
        ranges.push((lo, hi));
    }
    ranges.reverse();
    ranges
}

/// Reads, in one call to `source`, the hashes of `ranges`.
fn range_hashes<S: SubtreeSource>(
    ranges: &[(u64, u64)],
    source: &S,
) -> Result<Vec<Hash>, TreeError<S::Error>> {
    let mut nodes = Vec::new();
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges {
        let from = nodes.len();
        push_range_nodes(start, end, &mut nodes);
        spans.push(from..nodes.len());
    }
    let hashes = read_nodes(&nodes, source)?;
    Ok(spans
        .into_iter()
        .map(|span| fold_right(&hashes[span]))
        .collect())
}

/// The hashes of `nodes` from `source`, one per node.
fn read_nodes<S: SubtreeSource>(
    nodes: &[Node],
    source: &S,
) -> Result<Vec<Hash>, TreeError<S::Error>> {
    let hashes = source
        .subtree_hashes(nodes)
        .map_err(|source| TreeError::Source { source })?;
    if hashes.len() != nodes.len() {
        return Err(TreeError::ShortAnswer {
            asked: nodes.len(),
            got: hashes.len(),
        });
    }
    Ok(hashes)
}

/// The root of the tree of the first `size` leaves.
///
/// # Errors
/// [`TreeError::Source`] when the source cannot answer.
pub fn root<S: SubtreeSource>(size: u64, source: &S) -> Result<Hash, TreeError<S::Error>> {
    subtree_root(0, size, source)
}

/// The hash of leaves `start..end` as a subtree of the log's tree: `start`
/// must be 0 or a multiple of the smallest power of two ≥ `end - start` (the
/// subtrees of draft-ietf-plants-merkle-tree-certs; every complete subtree
/// and every prefix of the log is one). An empty range hashes to
/// [`empty_root`].
///
/// # Errors
/// [`TreeError::NotASubtree`] for another range; [`TreeError::Source`] when
/// the source cannot answer.
pub fn subtree_root<S: SubtreeSource>(
    start: u64,
    end: u64,
    source: &S,
) -> Result<Hash, TreeError<S::Error>> {
    let aligned = start == 0
        || end == start
        || end
            .checked_sub(start)
            .and_then(u64::checked_next_power_of_two)
            .is_some_and(|width| start.is_multiple_of(width));
    if end < start || !aligned {
        return Err(TreeError::NotASubtree { start, end });
    }
    if start == end {
        return Ok(empty_root());
    }
    Ok(range_hashes(&[(start, end)], source)?[0])
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves, in
/// RFC 9162 order (from the leaf's sibling up to the root's child).
///
/// # Errors
/// [`TreeError::LeafOutOfRange`] unless `index < size`;
/// [`TreeError::Source`] when the source cannot answer.
pub fn inclusion_proof<S: SubtreeSource>(
    index: u64,
    size: u64,
    source: &S,
) -> Result<Vec<Hash>, TreeError<S::Error>> {
    if index >= size {
        return Err(TreeError::LeafOutOfRange { index, size });
    }
    range_hashes(&inclusion_ranges(index, size), source)
}

/// The consistency proof that the tree of `old_size` leaves is a prefix of
/// the tree of `new_size` leaves, in RFC 9162 order (empty when the sizes
/// are equal).
///
/// # Errors
/// [`TreeError::BadSizes`] unless `0 < old_size <= new_size`;
/// [`TreeError::Source`] when the source cannot answer.
pub fn consistency_proof<S: SubtreeSource>(
    old_size: u64,
    new_size: u64,
    source: &S,
) -> Result<Vec<Hash>, TreeError<S::Error>> {
    if old_size == 0 || old_size > new_size {
        return Err(TreeError::BadSizes { old_size, new_size });
    }
    range_hashes(&consistency_ranges(old_size, new_size), source)
}

/// Why a proof does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is not in a tree of {size} leaves")]
    LeafOutOfRange {
        /// The proof's leaf index.
        index: u64,
        /// The proof's tree size.
        size: u64,
    },
    /// Consistency is only defined for `0 < old_size <= new_size`.
    #[error(
        "no consistency proof can exist from tree size {old_size} to {new_size}: the old size must be at least 1 and at most the new size"
    )]
    BadSizes {
        /// The older tree's size.
        old_size: u64,
        /// The newer tree's size.
        new_size: u64,
    },
    /// The proof has the wrong number of hashes for its sizes.
    #[error("the proof has {got} hashes where these tree sizes need {expected}")]
    WrongLength {
        /// Hashes the sizes call for.
        expected: usize,
        /// Hashes in the proof.
        got: usize,
    },
    /// The proof leads to another root than the one given.
    #[error("the proof leads to root {}, not to {}", b64(computed), b64(expected))]
    RootMismatch {
        /// The root the proof computes.
        computed: Hash,
        /// The root it was checked against.
        expected: Hash,
    },
    /// A consistency proof does not lead to the older tree's root.
    #[error(
        "the proof leads to old root {}, not to {}",
        b64(computed),
        b64(expected)
    )]
    OldRootMismatch {
        /// The old root the proof computes.
        computed: Hash,
        /// The old root it was checked against.
        expected: Hash,
    },
}

fn b64(hash: &Hash) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(hash)
}

/// A proof has exactly as many hashes as its sizes call for.
fn check_length(expected: usize, proof: &[Hash]) -> Result<(), ProofError> {
    if proof.len() != expected {
        return Err(ProofError::WrongLength {
            expected,
            got: proof.len(),
        });
    }
    Ok(())
}

/// Right-shifts both numbers until `fn_` is odd or 0 (RFC 9162's step).
fn shift_while_even(fn_: &mut u64, sn: &mut u64) {
    while *fn_ != 0 && *fn_ & 1 == 0 {
        *fn_ >>= 1;
        *sn >>= 1;
    }
}

/// The root an inclusion proof leads to, by RFC 9162 §2.1.3.2.
///
/// # Errors
/// [`ProofError::LeafOutOfRange`] or [`ProofError::WrongLength`].
pub fn root_from_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
) -> Result<Hash, ProofError> {
    if index >= size {
        return Err(ProofError::LeafOutOfRange { index, size });
    }
    check_length(inclusion_ranges(index, size).len(), proof)?;
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            shift_while_even(&mut fn_, &mut sn);
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    debug_assert_eq!(sn, 0, "a proof of the expected length ends at the root");
    Ok(r)
}

/// Checks that `proof` proves leaf `index` (hash `leaf_hash`) in the tree
/// of `size` leaves whose root is `root` (RFC 9162 §2.1.3.2).
///
/// # Errors
/// [`ProofError`] naming what does not hold.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    let computed = root_from_inclusion(leaf_hash, index, size, proof)?;
    if computed != *root {
        return Err(ProofError::RootMismatch {
            computed,
            expected: *root,
        });
    }
    Ok(())
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a
/// prefix of the tree of `new_size` leaves with root `new_root`
/// (RFC 9162 §2.1.4.2; equal sizes need an empty proof and equal roots).
///
/// # Errors
/// [`ProofError`] naming what does not hold.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size == 0 || old_size > new_size {
        return Err(ProofError::BadSizes { old_size, new_size });
    }
    check_length(consistency_ranges(old_size, new_size).len(), proof)?;
    let (old_computed, new_computed) = if old_size == new_size {
        (*old_root, *old_root)
    } else {
        roots_from_consistency(old_size, new_size, old_root, proof)
    };
    if old_computed != *old_root {
        return Err(ProofError::OldRootMismatch {
            computed: old_computed,
            expected: *old_root,
        });
    }
    if new_computed != *new_root {
        return Err(ProofError::RootMismatch {
            computed: new_computed,
            expected: *new_root,
        });
    }
    Ok(())
}

/// Steps 2–6 of RFC 9162 §2.1.4.2 for `0 < old_size < new_size` and a proof
/// of the right length: the old and new roots the proof leads to.
fn roots_from_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    proof: &[Hash],
) -> (Hash, Hash) {
    let mut path = proof.iter();
    let first = if old_size.is_power_of_two() {
        old_root
    } else {
        match path.next() {
            Some(first) => first,
            // The expected length is at least 1 when old_size is not a power of two.
            None => return (empty_root(), empty_root()),
        }
    };
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in path {
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            shift_while_even(&mut fn_, &mut sn);
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    debug_assert_eq!(sn, 0, "a proof of the expected length ends at the root");
    (fr, sr)
}

/// The right edge of a tree: the roots of the complete subtrees that make
/// up its first `size` leaves, largest first (one per set bit of `size`).
/// It is all a log needs to append a leaf and to know its root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    peaks: Vec<Hash>,
}

/// A compact range's peaks do not match its size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a tree of {size} leaves has {expected} peaks, not {got}")]
pub struct PeaksMismatch {
    /// The tree size.
    pub size: u64,
    /// Peaks the size calls for.
    pub expected: usize,
    /// Peaks given.
    pub got: usize,
}

impl CompactRange {
    /// The empty tree's.
    pub fn new() -> CompactRange {
        CompactRange::default()
    }

    /// The complete subtrees whose roots are the peaks of a tree of `size`
    /// leaves, largest (leftmost) first.
    pub fn peak_nodes(size: u64) -> Vec<Node> {
        let mut nodes = Vec::with_capacity(size.count_ones() as usize);
        push_range_nodes(0, size, &mut nodes);
        nodes
    }

    /// The range from its peaks' hashes (in [`CompactRange::peak_nodes`]
    /// order).
    ///
    /// # Errors
    /// [`PeaksMismatch`] when their number is not that of `size`'s set bits.
    pub fn from_peaks(size: u64, peaks: Vec<Hash>) -> Result<CompactRange, PeaksMismatch> {
        if peaks.len() != size.count_ones() as usize {
            return Err(PeaksMismatch {
                size,
                expected: size.count_ones() as usize,
                got: peaks.len(),
            });
        }
        Ok(CompactRange { size, peaks })
    }

    /// The range of the first `size` leaves, read from `source` (one call,
    /// at most 64 hashes).
    ///
    /// # Errors
    /// [`TreeError::Source`] or [`TreeError::ShortAnswer`].
    pub fn load<S: SubtreeSource>(
        size: u64,
        source: &S,
    ) -> Result<CompactRange, TreeError<S::Error>> {
        let peaks = read_nodes(&CompactRange::peak_nodes(size), source)?;
        Ok(CompactRange { size, peaks })
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The peaks' hashes, largest subtree first.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// The tree's root.
    pub fn root(&self) -> Hash {
        fold_right(&self.peaks)
    }

    /// Appends a leaf and calls `completed` with every subtree it completes,
    /// lowest first: the leaf itself (level 0), then each parent whose last
    /// leaf it is. These are the rows a store writes for the append.
    pub fn append(&mut self, leaf_hash: Hash, mut completed: impl FnMut(Node, &Hash)) {
        let leaf_index = self.size;
        let mut hash = leaf_hash;
        let mut level: u8 = 0;
        completed(
            Node {
                level,
                index: leaf_index,
            },
            &hash,
        );
        while (leaf_index >> level) & 1 == 1 {
            let Some(left) = self.peaks.pop() else { break };
            hash = node_hash(&left, &hash);
            level += 1;
            completed(
                Node {
                    level,
                    index: leaf_index >> level,
                },
                &hash,
            );
        }
        self.peaks.push(hash);
        self.size += 1;
    }
}

/// An in-memory tree holding every complete subtree's hash: the
/// [`SubtreeSource`] of tests, and a model of what a store keeps.
#[derive(Clone, Debug, Default)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
    range: CompactRange,
}

/// A subtree the source does not hold (not complete in its tree).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{node} is not a complete subtree of this tree")]
pub struct NodeMissing {
    /// The subtree asked for.
    pub node: Node,
}

impl MemoryTree {
    /// The empty tree.
    pub fn new() -> MemoryTree {
        MemoryTree::default()
    }

    /// Appends a leaf by its data.
    pub fn push(&mut self, data: &[u8]) {
        self.push_leaf_hash(leaf_hash(data));
    }

    /// Appends a leaf by its hash, keeping every subtree it completes.
    pub fn push_leaf_hash(&mut self, leaf_hash: Hash) {
        let levels = &mut self.levels;
        self.range.append(leaf_hash, |node, hash| {
            let level = usize::from(node.level);
            if levels.len() <= level {
                levels.resize_with(level + 1, Vec::new);
            }
            levels[level].push(*hash);
        });
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.range.size()
    }

    /// The root of the whole tree.
    pub fn root(&self) -> Hash {
        self.range.root()
    }

    /// The right edge of the whole tree.
    pub fn compact_range(&self) -> &CompactRange {
        &self.range
    }
}

impl SubtreeSource for MemoryTree {
    type Error = NodeMissing;

    fn subtree_hashes(&self, nodes: &[Node]) -> Result<Vec<Hash>, NodeMissing> {
        nodes
            .iter()
            .map(|&node| {
                usize::try_from(node.index)
                    .ok()
                    .and_then(|index| self.levels.get(usize::from(node.level))?.get(index))
                    .copied()
                    .ok_or(NodeMissing { node })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MTH of RFC 9162 §2.1.1, straight from its recursive definition.
    fn reference_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    fn tree(size: u64) -> (MemoryTree, Vec<Hash>) {
        let mut tree = MemoryTree::new();
        let mut leaves = Vec::new();
        for i in 0..size {
            let leaf = leaf_hash(&i.to_be_bytes());
            tree.push_leaf_hash(leaf);
            leaves.push(leaf);
        }
        (tree, leaves)
    }

    #[test]
    fn roots_agree_with_the_recursive_definition() {
        let (tree, leaves) = tree(70);
        for size in 0..=70u64 {
            let expected = reference_root(&leaves[..size as usize]);
            assert_eq!(root(size, &tree).unwrap(), expected, "size {size}");
        }
        assert_eq!(tree.root(), reference_root(&leaves));
    }

    #[test]
    fn every_proof_of_small_trees_verifies() {
        let (tree, leaves) = tree(33);
        for size in 1..=33u64 {
            let size_root = root(size, &tree).unwrap();
            for index in 0..size {
                let proof = inclusion_proof(index, size, &tree).unwrap();
                verify_inclusion(&leaves[index as usize], index, size, &proof, &size_root).unwrap();
            }
            for old in 1..=size {
                let proof = consistency_proof(old, size, &tree).unwrap();
                let old_root = root(old, &tree).unwrap();
                verify_consistency(old, size, &old_root, &size_root, &proof).unwrap();
            }
        }
    }

    #[test]
    fn append_names_the_subtrees_it_completes() {
        let mut range = CompactRange::new();
        let mut seen = Vec::new();
        for i in 0..8u64 {
            range.append(leaf_hash(&[i as u8]), |node, _| seen.push((i, node)));
        }
        let at = |leaf: u64| -> Vec<(u8, u64)> {
            seen.iter()
                .filter(|(i, _)| *i == leaf)
                .map(|(_, node)| (node.level, node.index))
                .collect()
        };
        assert_eq!(at(0), [(0, 0)]);
        assert_eq!(at(1), [(0, 1), (1, 0)]);
        assert_eq!(at(2), [(0, 2)]);
        assert_eq!(at(3), [(0, 3), (1, 1), (2, 0)]);
        assert_eq!(at(7), [(0, 7), (1, 3), (2, 1), (3, 0)]);
        assert_eq!(range.peaks().len(), 1);
    }

    #[test]
    fn peaks_of_a_size_are_its_set_bits() {
        let nodes = CompactRange::peak_nodes(13);
        let pairs: Vec<(u8, u64)> = nodes.iter().map(|n| (n.level, n.index)).collect();
        assert_eq!(pairs, [(3, 0), (2, 2), (0, 12)]);
        assert!(CompactRange::peak_nodes(0).is_empty());
        assert!(CompactRange::from_peaks(13, vec![[0; 32]; 2]).is_err());
    }

    #[test]
    fn a_loaded_range_appends_like_the_original() {
        let (mut tree, _) = tree(21);
        let mut loaded = CompactRange::load(21, &tree).unwrap();
        assert_eq!(&loaded, tree.compact_range());
        let next = leaf_hash(b"next");
        loaded.append(next, |_, _| {});
        tree.push_leaf_hash(next);
        assert_eq!(loaded.root(), tree.root());
    }

    #[test]
    fn bad_requests_are_refused() {
        let (tree, _) = tree(5);
        assert!(matches!(
            inclusion_proof(5, 5, &tree),
            Err(TreeError::LeafOutOfRange { index: 5, size: 5 })
        ));
        assert!(matches!(
            consistency_proof(0, 5, &tree),
            Err(TreeError::BadSizes { .. })
        ));
        assert!(matches!(
            consistency_proof(6, 5, &tree),
            Err(TreeError::BadSizes { .. })
        ));
        assert!(matches!(
            inclusion_proof(0, 6, &tree),
            Err(TreeError::Source { .. })
        ));
        assert!(matches!(
            subtree_root(1, 3, &tree),
            Err(TreeError::NotASubtree { start: 1, end: 3 })
        ));
        assert_eq!(
            subtree_root(4, 5, &tree).unwrap(),
            leaf_hash(&4u64.to_be_bytes())
        );
        assert_eq!(subtree_root(3, 3, &tree).unwrap(), empty_root());
    }

    #[test]
    fn wrong_lengths_and_roots_are_named() {
        let (tree, leaves) = tree(8);
        let size_root = tree.root();
        let mut proof = inclusion_proof(2, 8, &tree).unwrap();
        proof.push(size_root);
        assert_eq!(
            verify_inclusion(&leaves[2], 2, 8, &proof, &size_root),
            Err(ProofError::WrongLength {
                expected: 3,
                got: 4
            })
        );
        proof.pop();
        assert!(matches!(
            verify_inclusion(&leaves[3], 2, 8, &proof, &size_root),
            Err(ProofError::RootMismatch { .. })
        ));
        let old_root = root(3, &tree).unwrap();
        let proof = consistency_proof(3, 8, &tree).unwrap();
        assert!(matches!(
            verify_consistency(3, 8, &size_root, &size_root, &proof),
            Err(ProofError::OldRootMismatch { .. })
        ));
        assert!(matches!(
            verify_consistency(3, 8, &old_root, &old_root, &proof),
            Err(ProofError::RootMismatch { .. })
        ));
        assert_eq!(
            verify_consistency(8, 8, &size_root, &size_root, &[]),
            Ok(())
        );
    }
}
