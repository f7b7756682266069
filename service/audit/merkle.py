"""The Merkle tree of RFC 9162 (Certificate Transparency v2), section 2.1.

Leaves hash as SHA-256(0x00 || leaf) and interior nodes as SHA-256(0x01 || left || right), so a
node can never be passed off as a leaf. A tree of n > 1 leaves splits at the largest power of two
smaller than n; the empty tree's root is SHA-256("").

`MerkleFrontier` keeps one perfect subtree per set bit of the size (a compact range): appending is
O(log n) and the root at the current size costs O(log n). Proofs are planned as lists of leaf
ranges (`inclusion_path`, `consistency_path`) and their hashes gathered by `SubtreeCollector` in
one streaming pass over the leaves, so proving against a log of any size needs O(log n) memory.
The verifiers implement RFC 9162 sections 2.1.3.2 and 2.1.4.2 step by step and raise
`ProofError` on any failure: there is no boolean to forget to check.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from service.audit.errors import AuditError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

Range = tuple[int, int]
"""Leaves [start, end) of a subtree: every proof node is the Merkle tree hash of one range."""


class ProofError(AuditError, ValueError):
    """A proof does not verify, or was asked for with impossible arguments."""


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


# A perfect, aligned subtree (k, i): leaves [i * 2**k, (i + 1) * 2**k).
Node = tuple[int, int]


def perfect_subtrees(start: int, end: int) -> list[Node]:
    """The perfect aligned subtrees, left to right, whose hashes folded from the right give the
    RFC 9162 hash of leaves [start, end): the split of section 2.1.1 applied until each part is
    perfect. Every range a proof names, and [0, n), decomposes so."""
    if not 0 <= start < end:
        raise ProofError(f"[{start}, {end}) is not a range of leaves")
    width = end - start
    if width & (width - 1) == 0:
        if start % width:
            raise ProofError(f"[{start}, {end}) is not an aligned subtree")
        return [(width.bit_length() - 1, start // width)]
    split = 1 << ((width - 1).bit_length() - 1)
    return [*perfect_subtrees(start, start + split), *perfect_subtrees(start + split, end)]


def fold(hashes: list[bytes]) -> bytes:
    """The hash of consecutive subtrees from `perfect_subtrees`: right to left, as RFC 9162's
    split nests them."""
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = node_hash(left, result)
    return result


def _largest_power_of_two_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


class MerkleFrontier:
    """The right edge of an append-only tree: (start leaf, hash) of each maximal perfect subtree."""

    def __init__(self) -> None:
        self._nodes: list[tuple[int, bytes]] = []
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        end = self._size + 1
        node, width, size = leaf_hash, 1, self._size
        self._completed(end - 1, end, node)
        # Each set low bit of the old size is a perfect subtree that the new leaf completes.
        while size & 1:
            _, left = self._nodes.pop()
            node = node_hash(left, node)
            width <<= 1
            size >>= 1
            self._completed(end - width, end, node)
        self._nodes.append((end - width, node))
        self._size = end

    def _completed(self, start: int, end: int, node: bytes) -> None:
        """Hook: a perfect subtree over leaves [start, end) has just been hashed."""

    def root(self) -> bytes:
        return self.hash_from(0) if self._size else EMPTY_ROOT

    def hash_from(self, start: int) -> bytes:
        """The Merkle tree hash of leaves [start, size); `start` must begin a frontier subtree."""
        starts = [node_start for node_start, _ in self._nodes]
        if start not in starts:
            raise ValueError(
                f"leaf {start} does not begin a subtree of a tree of size {self._size}"
            )
        nodes = [node for _, node in self._nodes[starts.index(start) :]]
        result = nodes[-1]
        for left in reversed(nodes[:-1]):
            result = node_hash(left, result)
        return result


class SubtreeCollector(MerkleFrontier):
    """A frontier that also records the hash of each wanted range as the leaves stream past.

    Every range an RFC 9162 proof names is either a perfect aligned subtree (hashed while merging)
    or ends at the tree size and begins a frontier subtree there (folded when the size is reached).
    """

    def __init__(self, wanted: Iterable[Range]) -> None:
        super().__init__()
        self._wanted = set(wanted)
        self._by_end: dict[int, list[int]] = {}
        for start, end in self._wanted:
            self._by_end.setdefault(end, []).append(start)
        self.hashes: dict[Range, bytes] = {}

    def _completed(self, start: int, end: int, node: bytes) -> None:
        if (start, end) in self._wanted:
            self.hashes[(start, end)] = node

    def append(self, leaf_hash: bytes) -> None:
        super().append(leaf_hash)
        for start in self._by_end.pop(self.size, ()):
            if (start, self.size) not in self.hashes:
                self.hashes[(start, self.size)] = self.hash_from(start)


def subtree_hashes(leaf_hashes: Iterable[bytes], wanted: Iterable[Range]) -> dict[Range, bytes]:
    collector = SubtreeCollector(wanted)
    for leaf in leaf_hashes:
        collector.append(leaf)
    return collector.hashes


def inclusion_path(index: int, size: int) -> list[Range]:
    """The ranges whose hashes form leaf `index`'s audit path (RFC 9162 2.1.3.1), leaf first."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")

    def path(m: int, start: int, end: int) -> list[Range]:
        n = end - start
        if n == 1:
            return []
        k = _largest_power_of_two_below(n)
        if m < k:
            return [*path(m, start, start + k), (start + k, end)]
        return [*path(m - k, start + k, end), (start, start + k)]

    return path(index, 0, size)


def consistency_path(old_size: int, new_size: int) -> list[Range]:
    """The ranges whose hashes prove `old_size` is a prefix of `new_size` (RFC 9162 2.1.4.1)."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []

    def subproof(m: int, start: int, end: int, whole: bool) -> list[Range]:
        n = end - start
        if m == n:
            return [] if whole else [(start, end)]
        k = _largest_power_of_two_below(n)
        if m <= k:
            return [*subproof(m, start, start + k, whole), (start + k, end)]
        return [*subproof(m - k, start + k, end, False), (start, start + k)]

    return subproof(old_size, 0, new_size, True)


def _check_hashes(*hashes: bytes) -> None:
    if any(len(h) != HASH_SIZE for h in hashes):
        raise ProofError(f"every hash must be {HASH_SIZE} bytes")


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes
) -> None:
    """Raise ProofError unless `proof` shows `leaf` (raw leaf bytes) at `index` under `root_hash`.

    Taking the leaf itself, not its hash, is what stops an interior node from posing as a leaf.
    """
    _check_hashes(root_hash, *proof)
    # RFC 9162 2.1.3.2, steps 1-5.
    if index >= size or index < 0:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    fn, sn = index, size - 1
    r = leaf_hash(leaf)
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != root_hash:
        raise ProofError("inclusion proof does not lead to the root hash")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ProofError unless `proof` shows the tree at `old_size` is a prefix of `new_size`."""
    _check_hashes(old_root, new_root, *proof)
    if not 0 <= old_size <= new_size:
        raise ProofError(f"tree cannot shrink from size {old_size} to size {new_size}")
    # The two cases RFC 9162 leaves to the caller: nothing to prove, so the proof must be empty.
    if old_size == new_size:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("equal sizes with different root hashes")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        if old_root != EMPTY_ROOT:
            raise ProofError("the root hash of an empty tree is SHA-256 of nothing")
        return
    # RFC 9162 2.1.4.2, steps 1-7.
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the trees are deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the trees are deep")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root hash")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root hash")
