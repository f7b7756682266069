"""RFC 9162 Merkle tree: reference vectors, a naive model, and forged proofs that must fail."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.audit.merkle import (
    EMPTY_ROOT,
    MerkleFrontier,
    ProofError,
    consistency_path,
    inclusion_path,
    leaf_hash,
    node_hash,
    subtree_hashes,
    verify_consistency,
    verify_inclusion,
)

# Certificate Transparency's reference leaves and the root at each size (RFC 6962 test data).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (2, 8): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def naive_root(hashes: list[bytes]) -> bytes:
    """MTH of RFC 9162 2.1.1, written straight from the definition."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node_hash(naive_root(hashes[:k]), naive_root(hashes[k:]))


def naive_path(m: int, hashes: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1, over leaf hashes."""
    if len(hashes) <= 1:
        return []
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    if m < k:
        return [*naive_path(m, hashes[:k]), naive_root(hashes[k:])]
    return [*naive_path(m - k, hashes[k:]), naive_root(hashes[:k])]


def naive_subproof(m: int, hashes: list[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 2.1.4.1, over leaf hashes."""
    if m == len(hashes):
        return [] if whole else [naive_root(hashes)]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    if m <= k:
        return [*naive_subproof(m, hashes[:k], whole), naive_root(hashes[k:])]
    return [*naive_subproof(m - k, hashes[k:], False), naive_root(hashes[:k])]


def leaves(count: int) -> list[bytes]:
    return [f"leaf {i}".encode() for i in range(count)]


def prove_inclusion(data: list[bytes], index: int, size: int) -> list[bytes]:
    path = inclusion_path(index, size)
    hashes = subtree_hashes(map(leaf_hash, data[:size]), path)
    return [hashes[node] for node in path]


def prove_consistency(data: list[bytes], old: int, new: int) -> list[bytes]:
    path = consistency_path(old, new)
    hashes = subtree_hashes(map(leaf_hash, data[:new]), path)
    return [hashes[node] for node in path]


def root_of(data: list[bytes], size: int) -> bytes:
    return naive_root([leaf_hash(leaf) for leaf in data[:size]])


def test_roots_match_the_reference_vectors_at_every_size():
    frontier = MerkleFrontier()
    assert frontier.root() == EMPTY_ROOT == bytes.fromhex(CT_ROOTS[0])
    for size, leaf in enumerate(CT_LEAVES, start=1):
        frontier.append(leaf_hash(leaf))
        assert frontier.root().hex() == CT_ROOTS[size]


@pytest.mark.parametrize(("index", "size"), list(CT_INCLUSION))
def test_inclusion_proofs_match_the_reference_vectors(index, size):
    proof = prove_inclusion(CT_LEAVES, index, size)
    assert [node.hex() for node in proof] == CT_INCLUSION[(index, size)]
    verify_inclusion(CT_LEAVES[index], index, size, proof, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize(("old", "new"), list(CT_CONSISTENCY))
def test_consistency_proofs_match_the_reference_vectors(old, new):
    proof = prove_consistency(CT_LEAVES, old, new)
    assert [node.hex() for node in proof] == CT_CONSISTENCY[(old, new)]
    roots = bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new])
    verify_consistency(old, new, *roots, proof)


def test_frontier_root_equals_the_naive_tree_hash_for_every_size():
    data = leaves(70)
    frontier = MerkleFrontier()
    for size in range(71):
        assert frontier.root() == root_of(data, size)
        if size < 70:
            frontier.append(leaf_hash(data[size]))


@given(st.integers(min_value=1, max_value=300), st.data())
def test_inclusion_proofs_verify_for_random_sizes(size, data):
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    tree = leaves(size)
    proof = prove_inclusion(tree, index, size)
    assert proof == naive_path(index, [leaf_hash(leaf) for leaf in tree])
    verify_inclusion(tree[index], index, size, proof, root_of(tree, size))


@given(st.integers(min_value=0, max_value=300), st.data())
def test_consistency_proofs_verify_for_random_sizes(new, data):
    old = data.draw(st.integers(min_value=0, max_value=new))
    tree = leaves(new)
    proof = prove_consistency(tree, old, new)
    if 0 < old < new:
        assert proof == naive_subproof(old, [leaf_hash(leaf) for leaf in tree], True)
    verify_consistency(old, new, root_of(tree, old), root_of(tree, new), proof)


def mutations(proof: list[bytes]) -> list[list[bytes]]:
    """Every single-node flip, a missing first/last node, an extra node, and swapped nodes."""
    mutated = []
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([proof[i][0] ^ 1]) + proof[i][1:]
        mutated.append(flipped)
    if proof:
        mutated += [proof[1:], proof[:-1]]
    mutated += [[*proof, bytes(32)], [bytes(32), *proof], [*proof, proof[-1]] if proof else []]
    if len(proof) >= 2 and proof[0] != proof[1]:
        mutated.append([proof[1], proof[0], *proof[2:]])
    return [m for m in mutated if m != proof]


def test_every_mangled_inclusion_proof_is_rejected():
    tree = leaves(37)
    for size in range(1, 38):
        root = root_of(tree, size)
        for index in range(size):
            proof = prove_inclusion(tree, index, size)
            for forged in mutations(proof):
                with pytest.raises(ProofError):
                    verify_inclusion(tree[index], index, size, forged, root)
            for wrong_index in (index - 1, index + 1, index ^ 2):
                if 0 <= wrong_index < size and tree[wrong_index] != tree[index]:
                    with pytest.raises(ProofError):
                        verify_inclusion(tree[index], wrong_index, size, proof, root)
            # A size of the same tree height can share the path's shape; the signed checkpoint
            # pairs size with root, so only the height is the verifier's to catch.
            for wrong_size in (size * 2, size // 2):
                if wrong_size > index:
                    with pytest.raises(ProofError):
                        verify_inclusion(tree[index], index, wrong_size, proof, root)
            with pytest.raises(ProofError):
                verify_inclusion(b"another leaf", index, size, proof, root)
            with pytest.raises(ProofError):
                verify_inclusion(tree[index], index, size, proof, root_of(tree, size - 1))


def test_every_mangled_consistency_proof_is_rejected():
    tree = leaves(33)
    for new in range(1, 34):
        for old in range(1, new):
            roots = root_of(tree, old), root_of(tree, new)
            proof = prove_consistency(tree, old, new)
            for forged in mutations(proof):
                with pytest.raises(ProofError):
                    verify_consistency(old, new, *roots, forged)
            for wrong_old in (old - 1, old + 1):
                if 0 < wrong_old < new:
                    with pytest.raises(ProofError):
                        verify_consistency(wrong_old, new, *roots, proof)
            for wrong_new in (new * 2, new // 2):
                if wrong_new > old:
                    with pytest.raises(ProofError):
                        verify_consistency(old, wrong_new, *roots, proof)


def test_a_proof_from_a_forked_tree_is_rejected():
    honest = leaves(20)
    forked = [*honest[:12], *(b"forged " + leaf for leaf in honest[12:])]
    # The fork shares the first 12 leaves, so it proves itself consistent from size 12 ...
    proof = prove_consistency(forked, 12, 20)
    verify_consistency(12, 20, root_of(honest, 12), root_of(forked, 20), proof)
    # ... but never from a size it does not share, nor towards the honest tree.
    with pytest.raises(ProofError):
        verify_consistency(12, 20, root_of(honest, 12), root_of(honest, 20), proof)
    with pytest.raises(ProofError):
        verify_consistency(
            14, 20, root_of(honest, 14), root_of(forked, 20), prove_consistency(forked, 14, 20)
        )
    # An inclusion proof for a forged leaf does not lead to the honest root.
    with pytest.raises(ProofError):
        verify_inclusion(forked[15], 15, 20, prove_inclusion(forked, 15, 20), root_of(honest, 20))


def test_an_interior_node_cannot_pass_as_a_leaf():
    tree = leaves(4)
    hashes = [leaf_hash(leaf) for leaf in tree]
    left, right = node_hash(hashes[0], hashes[1]), node_hash(hashes[2], hashes[3])
    root = node_hash(left, right)
    # Without distinct prefixes, "leaf" left-children||right-children at index 0 of a 2-leaf tree
    # with audit path [right] would hash to the same root: the second-preimage trick.
    assert node_hash(left, right) == root
    with pytest.raises(ProofError):
        verify_inclusion(hashes[0] + hashes[1], 0, 2, [right], root)
    # Nor can the node's own hash be passed off as leaf data.
    with pytest.raises(ProofError):
        verify_inclusion(left, 0, 2, [right], root)


def test_inclusion_edge_cases_are_rejected():
    tree = leaves(8)
    root = root_of(tree, 8)
    proof = prove_inclusion(tree, 3, 8)
    for index, size in [(8, 8), (9, 8), (-1, 8), (0, 0), (3, 0)]:
        with pytest.raises(ProofError):
            verify_inclusion(tree[3], index, size, proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(tree[0], 0, 1, [], root)  # single-leaf tree, wrong root
    verify_inclusion(tree[0], 0, 1, [], leaf_hash(tree[0]))
    with pytest.raises(ProofError):
        verify_inclusion(tree[0], 0, 1, [bytes(32)], leaf_hash(tree[0]))
    with pytest.raises(ProofError):
        verify_inclusion(tree[3], 3, 8, [proof[0][:31], *proof[1:]], root)
    with pytest.raises(ProofError):
        verify_inclusion(tree[3], 3, 8, proof, root[:31])
    with pytest.raises(ProofError):
        inclusion_path(8, 8)


def test_consistency_edge_cases():
    tree = leaves(8)
    r4, r5, r8 = root_of(tree, 4), root_of(tree, 5), root_of(tree, 8)
    verify_consistency(4, 4, r4, r4, [])
    verify_consistency(0, 8, EMPTY_ROOT, r8, [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    rejected = [
        (4, 4, r4, r5, []),  # equal sizes, different roots
        (4, 4, r4, r4, [bytes(32)]),  # equal sizes take no proof
        (0, 8, r4, r8, []),  # an empty tree has one root
        (0, 8, EMPTY_ROOT, r8, [bytes(32)]),  # and needs no proof
        (5, 8, r5, r8, []),  # a real step needs a proof
        (8, 4, r8, r4, prove_consistency(tree, 4, 8)),  # trees do not shrink
        (4, 8, r4, r8[:31], prove_consistency(tree, 4, 8)),
    ]
    for old, new, old_root, new_root, proof in rejected:
        with pytest.raises(ProofError):
            verify_consistency(old, new, old_root, new_root, proof)
    with pytest.raises(ProofError):
        consistency_path(5, 3)


def test_subtree_hashes_stream_any_proof_range():
    tree = leaves(45)
    hashes = [leaf_hash(leaf) for leaf in tree]
    wanted = set(inclusion_path(17, 45)) | set(consistency_path(13, 45)) | {(0, 45), (32, 45)}
    for (start, end), value in subtree_hashes(hashes, wanted).items():
        assert value == naive_root(hashes[start:end])
    assert set(subtree_hashes(hashes, wanted)) == wanted
