"""Shared-prefix ("cascade") decode attention: which rows of a decode batch share leading KV pages.

When many rows of a decode batch start with the same pages (one system prompt, one document asked
many questions, the prefix cache's hits), the per-row decode kernel still moves every row's copy of
those pages through its SM: at B=256 with a 2048-token shared prefix that is 5x more bytes than the
unique pages (docs/perf-notes.md, "B4's decode"). Grouping the rows lets one program read a shared
page once for up to `tile_size` rows and all their query heads, a tensor-core-sized query block.

The host plans the groups (`plan_shared_prefix`, numpy, per step) as three i32 numbers per row, which
ride in the step's packed row matrix; `SharedPrefix.from_rows` turns them into the kernel's tables on
the device. The plan never changes the result, only how it is computed: every backend must return
what `paged_attention_reference` returns for the same batch, with or without a plan. A tile's rows
agree on its pages by construction (they hold the same page ids), so the reference can ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

# A tile of two rows already halves their reads of the prefix. With 256 running rows drawn from 64
# interleaved groups (B4), a quarter of the rows are in groups of 2-3 (docs/perf-notes.md).
MIN_TILE_ROWS = 2
# Decode batches smaller than this get no plan (and no second compiled step): they read little.
MIN_PLAN_BATCH = 8
# Query rows per tile and KV head: rows x query heads per KV head. 64 fills a tensor-core M block.
TILE_QUERY_ROWS = 64


def tile_size_for(q_per_kv: int, batch: int) -> int:
    """Rows per tile: enough rows that a tile's query block (rows x G heads) is TILE_QUERY_ROWS, but no
    more than the batch has (a small bucket's tiles would be mostly padding)."""
    return min(max(MIN_TILE_ROWS, TILE_QUERY_ROWS // q_per_kv), batch)


def max_tiles_for(batch: int) -> int:
    """Tiles a batch of `batch` rows can need: every tile holds at least MIN_TILE_ROWS rows."""
    return max(1, batch // MIN_TILE_ROWS)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SharedPrefix:
    """Decode rows grouped into tiles that share their first `tile_len` tokens' pages.

    The prefix kernel reads each tile's pages (those of its first row) once for all its rows; each
    row's own pass then starts at `row_start`. Unused tiles have tile_len 0 and rows B (out of range).
    """

    tile_rows: jax.Array  # i32[G, R] batch row of each tile member; B pads
    tile_len: jax.Array  # i32[G] shared tokens of each tile, whole pages; 0: unused tile
    row_tile: jax.Array  # i32[B] the row's tile, or G for a row in none
    row_slot: jax.Array  # i32[B] the row's index in its tile (0 for a row in none)
    row_start: jax.Array  # i32[B] first key of the row's own pass: its tile's tile_len, or 0

    @staticmethod
    def from_rows(row_tile: jax.Array, row_slot: jax.Array, row_start: jax.Array, *, num_tiles: int,
                  tile_size: int) -> SharedPrefix:
        """The device tables from the host's per-row plan (`plan_shared_prefix`; a row in no tile has
        row_tile = num_tiles and row_start = 0, padding rows included)."""
        batch = row_tile.shape[0]
        rows = jnp.arange(batch, dtype=jnp.int32)
        tile_rows = jnp.full((num_tiles, tile_size), batch, jnp.int32)
        tile_rows = tile_rows.at[row_tile, row_slot].set(rows, mode="drop")  # row_tile == G drops
        tile_len = jnp.zeros((num_tiles,), jnp.int32).at[row_tile].max(row_start, mode="drop")
        return SharedPrefix(tile_rows=tile_rows, tile_len=tile_len, row_tile=row_tile, row_slot=row_slot,
                            row_start=row_start)


def plan_shared_prefix(
    block_tables: np.ndarray,  # i32[n, pages_per_seq] the batch's real rows
    kv_lens: np.ndarray,  # i32[n] tokens each row attends to (its current token included)
    *,
    page_size: int,
    tile_size: int,
    max_tiles: int,
    min_rows: int = MIN_TILE_ROWS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by their first page into tiles; returns i32[n] (row_tile, row_slot, row_start).

    A group is the rows whose first page id is the same; its shared length is the longest run of
    leading page ids all its rows agree on, capped so every row keeps at least its current token for
    its own pass (a row's own pass is never empty, so the merge always has a real part). Groups are
    cut into tiles of at most `tile_size` rows; tiles of fewer than `min_rows` rows, and tiles past
    `max_tiles`, are dropped (their rows take the plain path: row_tile = max_tiles, row_start = 0).
    """
    n = len(kv_lens)
    row_tile = np.full(n, max_tiles, np.int32)
    row_slot = np.zeros(n, np.int32)
    row_start = np.zeros(n, np.int32)
    if n < min_rows:
        return row_tile, row_slot, row_start
    first = block_tables[:, 0]
    order = np.argsort(first, kind="stable")
    bounds = np.flatnonzero(np.diff(first[order])) + 1
    if np.diff(bounds, prepend=0, append=n).max() < min_rows:  # the usual batch: no group could fill a tile
        return row_tile, row_slot, row_start
    # Whole pages each row may hand to a tile: all but the page holding its last key.
    own_pages = np.maximum(kv_lens - 1, 0) // page_size
    tiles = 0
    for group in np.split(order, bounds):
        if len(group) < min_rows or tiles == max_tiles:
            continue
        limit = int(own_pages[group].min())
        if limit == 0:
            continue
        tables = block_tables[group, :limit]
        agree = (tables == tables[0]).all(axis=0)  # [limit] pages every row of the group shares
        shared = int(np.argmin(agree)) if not agree.all() else limit
        if shared == 0:
            continue
        for tile in range(0, len(group), tile_size):
            members = group[tile : tile + tile_size]
            if len(members) < min_rows or tiles == max_tiles:
                break
            row_tile[members] = tiles
            row_slot[members] = np.arange(len(members))
            row_start[members] = shared * page_size
            tiles += 1
    return row_tile, row_slot, row_start
