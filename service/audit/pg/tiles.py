"""The Merkle tree as C2SP tlog-tiles of height 8, as `audit_tiles` stores it, and the frontier.

Node (k, i) is the RFC 9162 hash of the perfect, aligned subtree over leaves [i * 2**k,
(i + 1) * 2**k): level 0 holds the leaf hashes. Tile (L, t) holds the level-8L nodes
t * 256 .. t * 256 + w - 1, w <= 256, in order (32 bytes each); a node of level 8L + j (j < 8)
is hashed from 2**j consecutive nodes of one tile. A tile is partial until its 256th node is
written, then never changes; the prefix it holds at any size is final. These are the nodes
`index/level-KK` of the file log keeps one file per level (service/audit/index.py); the range
arithmetic below is the same as its `_Reader.range_hash`, over tiles instead of level files.

The frontier of a tree of n leaves (the maximal perfect subtrees of [0, n), one per set bit of
n, left to right) is what appending needs to continue the tree and give its root. It is not
stored apart: as Tessera's MySQL driver does, an appender reads it from the tiles on the tree's
right edge (at most one per tile level) in the transaction that holds the state row, and checks
that it gives the row's root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from service.audit.merkle import (
    HASH_SIZE,
    MerkleFrontier,
    Node,
    fold,
    node_hash,
    perfect_subtrees,
)

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_TILE_LEVEL = 7  # audit_tiles.level's CHECK: 2**64 leaves fit

TileKey = tuple[int, int]
"""(tile level, tile index)."""
"""(tree level, node index) of a perfect aligned subtree."""


def tile_of(node: Node) -> tuple[TileKey, int, int]:
    """Where node (k, i) is kept: its tile, the slot of its first level-8L node there, and how
    many consecutive level-8L nodes (2**j) it is hashed from."""
    level, index = node
    tile_level, below = divmod(level, TILE_HEIGHT)
    first = index << below
    return (tile_level, first >> TILE_HEIGHT), first & (TILE_WIDTH - 1), 1 << below


def tile_width(key: TileKey, size: int) -> int:
    """How many nodes tile `key` holds in a tree of `size` leaves (0: it does not exist yet)."""
    tile_level, tile_index = key
    complete = size >> (TILE_HEIGHT * tile_level)  # nodes of level 8L in the tree
    return max(0, min(TILE_WIDTH, complete - tile_index * TILE_WIDTH))


def tiles_for(nodes: Iterable[Node]) -> set[TileKey]:
    return {tile_of(node)[0] for node in nodes}


def frontier_tiles(size: int) -> set[TileKey]:
    """The tiles the frontier of a tree of `size` leaves is read from: one per tile level at
    most, on the right edge."""
    return tiles_for(perfect_subtrees(0, size)) if size else set()


class TileError(ValueError):
    """A stored tile does not hold a node the tree of that size has: missing or cut short."""


def node_from_tiles(tiles: Mapping[TileKey, bytes], node: Node) -> bytes:
    """The hash of `node` from the tile holding it."""
    key, slot, span = tile_of(node)
    nodes = tiles.get(key)
    if nodes is None or len(nodes) < (slot + span) * HASH_SIZE:
        raise TileError(f"tile (level {key[0]}, index {key[1]}) is missing or too short")
    hashes = [nodes[n * HASH_SIZE : (n + 1) * HASH_SIZE] for n in range(slot, slot + span)]
    while len(hashes) > 1:
        hashes = [node_hash(hashes[n], hashes[n + 1]) for n in range(0, len(hashes), 2)]
    return bytes(hashes[0])


def range_hash(tiles: Mapping[TileKey, bytes], start: int, end: int) -> bytes:
    """The RFC 9162 hash of leaves [start, end) from the tiles (which must hold every node
    `perfect_subtrees(start, end)` names)."""
    return fold([node_from_tiles(tiles, node) for node in perfect_subtrees(start, end)])


class TileFrontier(MerkleFrontier):
    """The tree's right edge, continued from a stored frontier, collecting every node a tile
    keeps as leaves are appended (`added`: per tile, the nodes appended to it, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.added: dict[TileKey, bytearray] = {}

    @classmethod
    def from_tiles(cls, size: int, tiles: Mapping[TileKey, bytes]) -> TileFrontier:
        """The frontier of a tree of `size` leaves, read from its tiles (`frontier_tiles`);
        TileError if one is missing or too short."""
        frontier = cls()
        subtrees = perfect_subtrees(0, size) if size else []
        frontier._nodes = [
            (index << level, node_from_tiles(tiles, (level, index))) for level, index in subtrees
        ]
        frontier._size = size
        return frontier

    def continued(self) -> TileFrontier:
        """A copy to append a batch to, its `added` empty; this one stays as it is."""
        frontier = TileFrontier()
        frontier._nodes = list(self._nodes)
        frontier._size = self._size
        return frontier

    def _completed(self, start: int, end: int, node: bytes) -> None:
        level = (end - start).bit_length() - 1
        if level % TILE_HEIGHT == 0:
            key = (level // TILE_HEIGHT, (start >> level) >> TILE_HEIGHT)
            pending = self.added.get(key)
            if pending is None:
                self.added[key] = bytearray(node)
            else:
                pending += node
