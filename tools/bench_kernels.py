"""Check and time our Pallas paged-attention kernels on the GPU at Llama-3.1-8B attention shapes.

    PYTHONUNBUFFERED=1 python tools/bench_kernels.py [--quick] [--out DIR]

Shapes: 32 query heads, 8 KV heads, head_dim 128, bf16, page size 64 (xlkernels.paged_attention layout).
(a) correctness: each kernel (and JAX's library decode kernel, our baseline) against the XLA reference
    computed in f32 on the same device: ragged rows, a length-1 row, page boundaries, padding rows.
(b) timing: decode at batch 1/8/32/128 x context 512/2048/8192 (plus ragged batches), prefill chunks of
    512/2048 tokens over 0 and 2048 cached tokens; ours vs the XLA reference, JAX's library Pallas
    paged decode kernel, and cuDNN dense attention (prefill). Prints bytes moved and TB/s against the
    2.87 TB/s copy bandwidth measured on the lent H100, then a compact table last.

Method (see /work/.library/device/METHOD.md): each timed executable chains `calls` kernel calls, the
output of one being the next one's queries (same shape, so nothing extra runs between them and no call
can be hoisted or skipped); consecutive calls read different page sets until the distinct K/V bytes
exceed ~3x the 50 MB L2, so small problems are timed from HBM, not from cache. Executables are dispatched
back to back without host syncs, and the median over trials is reported per call. The per-call figure
therefore includes XLA's kernel-launch gap, as in the model; `launch floor` prints that gap alone.
--quick runs tiny shapes in interpret mode on CPU to test this script itself.

--shared-prefix runs only (c) shared prefixes (B4's decode): B=256 rows of ~2304 tokens in 4096-token
tables, either all pages distinct, or 16 groups of 16 rows sharing their first 2048 tokens' pages (rows
of a group adjacent, or interleaved as arrival order gives), to see whether shared pages are served
from the L2, and how the shared-prefix kernels (one pass over each tile's shared pages, `cascade*` rows)
compare. TB/s there is "effective": the bytes if every row read its own pages, over the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xlkernels.paged_attention import paged_attention_reference  # noqa: E402
from xlkernels.pallas_decode import (  # noqa: E402
    default_k_splits,
    default_pages_per_block,
    paged_decode_attention,
)
from xlkernels.pallas_prefill import paged_prefill_attention  # noqa: E402
from xlkernels.pallas_shared_prefix import shared_prefix_decode_attention  # noqa: E402
from xlkernels.shared_prefix import SharedPrefix, max_tiles_for, plan_shared_prefix, tile_size_for  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)  # the Triton lowering warns from jax 0.11

COPY_TBPS = 2.87  # device copy bandwidth measured on the lent H100 (design brief), read + write
MATMUL_TFLOPS = 784.0  # bf16 8192^3 matmul measured there
L2_BYTES = 50 * 2**20
TIME_BUDGET_S = 500.0  # stop starting new timings past this, so the run ends inside the device limit
# B4 (SGLang's generated-shared-prefix) at one decode step: 256 running rows of 16 groups, a 2048-token
# shared system prompt, 128-token questions and up to 256 output tokens, in 4096-token session tables.
SHARED_BATCH, SHARED_GROUPS, SHARED_PREFIX, SHARED_LENS, SHARED_TABLE = 256, 16, 2048, (2176, 2432), 4096

AttnFn = Callable[..., jax.Array]


@dataclass(frozen=True)
class Shape:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 64
    dtype: jnp.dtype = jnp.bfloat16

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def kv_bytes(self, tokens: int) -> int:  # K and V of `tokens` cached tokens, all KV heads
        return 2 * tokens * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize


@dataclass
class Problem:
    """Paged inputs with `sets` distinct page sets of the same shape (to rotate through in timing)."""

    q: jax.Array  # [B, T, Hq, D]
    k_pages: jax.Array  # [Hkv, P, PS, D]
    v_pages: jax.Array
    tables: list[jax.Array]  # sets x i32[B, pps]
    positions: jax.Array  # i32[B, T]
    kv_lens: jax.Array  # i32[B]
    starts: np.ndarray  # cached tokens before the chunk, per row (-1: padding row)

    def args(self, which: int = 0) -> tuple[jax.Array, ...]:
        return (self.q, self.k_pages, self.v_pages, self.tables[which], self.positions, self.kv_lens)


def make_problem(
    shape: Shape, starts: np.ndarray, num_q: int, pages_per_seq: int, sets: int, seed: int
) -> Problem:
    """Rows start at `starts` (cached tokens, -1 = padding row) and add num_q tokens; pages are a random
    permutation of the pool, so each row's pages are scattered; page 0 is the padding rows' null page."""
    batch = len(starts)
    num_pages = sets * batch * pages_per_seq + 1
    key_q, key_k, key_v = jax.random.split(jax.random.key(seed), 3)
    pool = (shape.num_kv_heads, num_pages, shape.page_size, shape.head_dim)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.arange(1, num_pages)).reshape(sets, batch, pages_per_seq)
    real = starts >= 0
    perm[:, ~real] = 0
    positions = np.maximum(starts, 0)[:, None] + np.arange(num_q)[None, :]
    lens = np.where(real, positions[:, -1] + 1, 0)
    return Problem(
        q=jax.random.normal(key_q, (batch, num_q, shape.num_heads, shape.head_dim), shape.dtype),
        k_pages=jax.random.normal(key_k, pool, shape.dtype),
        v_pages=jax.random.normal(key_v, pool, shape.dtype),
        tables=[jnp.asarray(t, jnp.int32) for t in perm],
        positions=jnp.asarray(positions, jnp.int32),
        kv_lens=jnp.asarray(lens, jnp.int32),
        starts=starts,
    )


def shared_prefix_table(table: np.ndarray, groups: int, shared_pages: int, interleaved: bool) -> np.ndarray:
    """Rows of a group take the group's first row's first `shared_pages` pages, then keep their own.
    Interleaved: row r is in group r % groups (arrival order); else the rows of a group are adjacent."""
    rows = np.arange(table.shape[0])
    size = table.shape[0] // groups
    first_row = rows % groups if interleaved else rows // size * size
    shared = table.copy()
    shared[:, :shared_pages] = table[first_row, :shared_pages]
    return shared


def unique_page_bytes(shape: Shape, table: np.ndarray, lens: np.ndarray) -> int:
    """K/V bytes of the distinct pages the rows read (what HBM must deliver at least once)."""
    live = np.arange(table.shape[1])[None, :] < pl_cdiv(lens, shape.page_size)[:, None]
    return shape.kv_bytes(shape.page_size) * len(np.unique(table[live]))


def chained(fn: AttnFn, calls: int, sets: int) -> Callable[..., jax.Array]:
    """One executable running `calls` dependent calls (queries <- previous output), rotating page sets."""

    def run(q, k_pages, v_pages, tables, positions, kv_lens):
        for i in range(calls):
            q = fn(q, k_pages, v_pages, tables[i % sets], positions, kv_lens)
        return q

    return jax.jit(run)


def time_per_call(fn: AttnFn, problem: Problem, calls: int, reps: int, trials: int) -> float:
    """Median seconds per kernel call (see module docstring)."""
    sets = len(problem.tables)
    run = chained(fn, calls, sets)
    args = (problem.q, problem.k_pages, problem.v_pages, tuple(problem.tables), problem.positions,
            problem.kv_lens)
    run(*args).block_until_ready()  # compile and warm up
    run(*args).block_until_ready()
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            out = run(*args)
        out.block_until_ready()
        samples.append((time.perf_counter() - start) / (reps * calls))
    return statistics.median(samples)


def rel_error(out: jax.Array, want: jax.Array, rows: np.ndarray) -> tuple[float, float, bool]:
    """(||out - ref|| / ||ref||, max |out - ref|, all finite) over the real rows."""
    got = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(want.astype(jnp.float32))
    finite = bool(np.isfinite(got).all())
    got, ref = got[rows], ref[rows]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), float(np.abs(got - ref).max()), finite


def reference_f32(problem: Problem, shape: Shape) -> jax.Array:
    f32 = jnp.float32
    q, k, v, tables, positions, kv_lens = problem.args()
    return jax.jit(paged_attention_reference, static_argnames="scale")(
        q.astype(f32), k.astype(f32), v.astype(f32), tables, positions, kv_lens, scale=shape.scale)


class Bench:
    def __init__(self, shape: Shape, out_dir: str | None, interpret: bool, quick: bool):
        self.shape, self.interpret, self.quick = shape, interpret, quick
        self.rows: list[dict] = []
        self.started = time.perf_counter()
        self.log = open(os.path.join(out_dir, "results.jsonl"), "w") if out_dir else None  # noqa: SIM115
        self.reps, self.trials = (1, 1) if quick else (10, 5)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > TIME_BUDGET_S

    def record(self, row: dict) -> None:
        self.rows.append(row)
        fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print("  " + "  ".join(fields))
        if self.log:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()

    # ----- implementations -----
    def ours(self, **tunables) -> AttnFn:
        def attend(q, k, v, tables, positions, kv_lens):
            kernel = paged_decode_attention if q.shape[1] == 1 else paged_prefill_attention
            return kernel(q, k, v, tables, positions, kv_lens, scale=self.shape.scale,
                          interpret=self.interpret, **tunables)

        return attend

    def shared_prefix_attend(self, table: np.ndarray, lens: np.ndarray, **tunables) -> tuple[AttnFn, int]:
        """The shared-prefix kernels with the engine's plan for these rows; also the number of tiles."""
        shape = self.shape
        batch = len(lens)
        tile_size, max_tiles = tile_size_for(shape.num_heads // shape.num_kv_heads, batch), max_tiles_for(batch)
        plan = plan_shared_prefix(table, lens, page_size=shape.page_size, tile_size=tile_size, max_tiles=max_tiles)
        shared = SharedPrefix.from_rows(*(jnp.asarray(part) for part in plan), num_tiles=max_tiles,
                                        tile_size=tile_size)

        def attend(q, k, v, tables, positions, kv_lens):
            return shared_prefix_decode_attention(q, k, v, tables, positions, kv_lens, shared, scale=shape.scale,
                                                  interpret=self.interpret, **tunables)

        return attend, int((np.asarray(shared.tile_len) > 0).sum())

    def xla(self) -> AttnFn:
        def attend(q, k, v, tables, positions, kv_lens):
            return paged_attention_reference(q, k, v, tables, positions, kv_lens, scale=self.shape.scale)

        return attend

    def library_decode(self, pages_per_seq: int) -> AttnFn:
        from jax.experimental.pallas.ops.gpu import paged_attention as lib

        # Its split count must divide the table width (16 splits is its default). Its default of 8 pages
        # per block is 512 tokens at page size 64, which needs 276 KB of shared memory on the H100
        # (RESOURCE_EXHAUSTED): use 128-token blocks, as its defaults give at page size 16.
        k_splits = math.gcd(16, pages_per_seq)
        ppcb = min(max(1, 128 // self.shape.page_size), pages_per_seq // k_splits)

        def attend(q, k, v, tables, positions, kv_lens):
            # It has no softmax scale argument: fold the scale into q (one tiny extra op per call).
            q = (q * self.shape.scale).astype(q.dtype)
            out = lib.paged_attention(q[:, 0], k, v, tables, kv_lens, k_splits=k_splits,
                                      pages_per_compute_block=ppcb, interpret=self.interpret)
            return out[:, None]

        return attend

    def cudnn_dense(self, cached: int, num_q: int) -> list[tuple[str, AttnFn]]:
        """cuDNN flash attention over dense, contiguous K/V of the same length (the library baseline has
        no pages); only the chained queries change between calls. With a cached prefix the causal mask
        is bottom-right, which cuDNN's is_causal (top-left) is not: try an explicit mask first, and
        fall back to no mask (an upper bound on the work: T*(cached+T) pairs instead of ~T*cached+T^2/2)."""
        shape = self.shape
        total = cached + num_q
        key_k, key_v = jax.random.split(jax.random.key(7))
        dense = (1, total, shape.num_kv_heads, shape.head_dim)  # [B, S, Hkv, D]
        k, v = jax.random.normal(key_k, dense, shape.dtype), jax.random.normal(key_v, dense, shape.dtype)
        q_pos = cached + jnp.arange(num_q)
        mask = (jnp.arange(total)[None, :] <= q_pos[:, None])[None, None]  # bool[1, 1, T, S]

        def attend(q, *_, mask=None, causal=False):
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=shape.scale,
                                                implementation="cudnn")

        if not cached:
            return [("cudnn-causal", lambda q, *_: attend(q, causal=True))]
        return [("cudnn-mask", lambda q, *_: attend(q, mask=mask)), ("cudnn-nomask", attend)]

    # ----- checks -----
    def check(self, name: str, fn: AttnFn, problem: Problem, want: jax.Array) -> None:
        try:
            out = jax.jit(fn)(*problem.args())
            rel, max_abs, finite = rel_error(out, want, problem.starts >= 0)
            ok = finite and rel < 1e-2
            self.record({"check": name, "rel_err": rel, "max_abs": max_abs, "finite": finite,
                         "result": "PASS" if ok else "FAIL"})
        except Exception as exc:  # a failing implementation must not stop the others
            self.record({"check": name, "result": f"ERROR {type(exc).__name__}: {str(exc)[:300]}"})

    def correctness(self) -> None:
        shape = self.shape
        print("\n== (a) correctness vs the XLA reference in f32 (rel = ||out-ref||/||ref||, bf16 inputs)")
        ctx = 512 if self.quick else 8192
        pps = ctx // shape.page_size
        # Lengths: 1, exactly one page, one page + 1, mid-page, a full table; one padding row.
        ps = shape.page_size
        starts = np.array([0, ps - 1, ps, ctx // 3, ctx - 1, ctx // 2 + 5, -1, 2 * ps + 7])
        problem = make_problem(shape, starts, 1, pps, 1, seed=1)
        want = reference_f32(problem, shape)
        self.check("decode ours (default splits)", self.ours(), problem, want)
        self.check("decode ours (k_splits=1)", self.ours(k_splits=1), problem, want)
        self.check("decode library", self.library_decode(pps), problem, want)
        chunk = 64 if self.quick else 512
        starts = np.array([0, 1000 if not self.quick else 100, -1])  # prefix hit mid-page; padding row
        problem = make_problem(shape, starts, chunk, pl_cdiv(int(starts.max()) + chunk, shape.page_size),
                               1, seed=2)
        want = reference_f32(problem, shape)
        self.check("prefill ours", self.ours(), problem, want)

    # ----- timing -----
    def timed(self, kind: str, config: str, impl: str, fn: AttnFn, problem: Problem, calls: int,
              bytes_moved: int, flops: float, extra: dict | None = None) -> dict | None:
        """Time one implementation and record the row; None if it could not run."""
        if self.over_budget():
            self.record({"kind": kind, "config": config, "impl": impl, "result": "SKIPPED (time budget)"})
            return None
        try:
            seconds = time_per_call(fn, problem, calls, self.reps, self.trials)
        except Exception as exc:
            self.record({"kind": kind, "config": config, "impl": impl,
                         "result": f"ERROR {type(exc).__name__}: {str(exc)[:300]}"})
            return None
        tbps = bytes_moved / seconds / 1e12
        row = {"kind": kind, "config": config, "impl": impl, "us": seconds * 1e6, "MB": bytes_moved / 1e6,
               "TBps": tbps, "pct_copy_bw": 100 * tbps / COPY_TBPS}
        if flops:
            row["TFLOPs"] = flops / seconds / 1e12
        row.update(extra or {})
        self.record(row)
        return row

    def decode_config(
        self, batch: int, ctx: int, ragged: bool, variants: dict[str, dict] | None = None,
        table_ctx: int | None = None,
    ) -> None:
        """Decode over rows of length ctx (ragged: uniform in [1, ctx]). The block tables hold
        table_ctx tokens (default ctx): the engine sizes them by the session length, so rows are
        often much shorter than their tables, which matters to the split heuristic."""
        shape = self.shape
        pps = (table_ctx or ctx) // shape.page_size
        rng = np.random.default_rng(batch * 7 + ctx)
        if ragged:  # uniform lengths in [1, ctx], with a length-1 row and a full row
            lens = rng.integers(1, ctx + 1, size=batch)
            lens[0], lens[-1] = 1, ctx
        else:
            lens = np.full(batch, ctx)
        moved = shape.kv_bytes(int(lens.sum()))
        sets = max(1, min(16, math.ceil(3 * L2_BYTES / max(moved, 1))))
        calls = max(4, sets)
        # Tiny problems fit in L2 even across 16 page sets; they are launch-bound anyway: flag them.
        extra = {"l2_resident": sets * moved < 2 * L2_BYTES}
        problem = make_problem(shape, lens - 1, 1, pps, sets, seed=batch + ctx)
        config = f"B={batch} ctx={'<=' if ragged else ''}{ctx}" + (f" tbl={table_ctx}" if table_ctx else "")
        print(f"\n-- decode {config}: {moved / 1e6:.1f} MB of K/V per call, {sets} page sets, {calls} calls")
        for name, tunables in (variants or {"ours": {}}).items():
            ppb = tunables.get("pages_per_block", default_pages_per_block(shape.page_size))
            blocks = pl_cdiv(pps, ppb)
            splits = tunables.get("k_splits", default_k_splits(batch, shape.num_kv_heads, blocks,
                                                               ppb * shape.page_size))
            self.timed("decode", config, name, self.ours(**tunables), problem, calls, moved, 0.0,
                       {**extra, "k_splits": splits})
        if variants:
            return
        self.timed("decode", config, "library", self.library_decode(pps), problem, calls, moved, 0.0, extra)
        self.timed("decode", config, "xla", self.xla(), problem, calls, moved, 0.0, extra)

    def prefill_config(self, chunk: int, cached: int, variants: dict[str, dict] | None = None) -> None:
        shape = self.shape
        total = cached + chunk
        pps = pl_cdiv(total, shape.page_size)
        problem = make_problem(shape, np.array([cached]), chunk, pps, 1, seed=chunk)
        # Minimum traffic: K/V once, q read and out written once; FLOPs of the visible (causal) pairs only.
        moved = shape.kv_bytes(total) + 2 * chunk * shape.num_heads * shape.head_dim * 2
        pairs = chunk * cached + chunk * (chunk + 1) // 2
        flops = 4.0 * shape.num_heads * shape.head_dim * pairs
        config = f"T={chunk} cached={cached}"
        print(f"\n-- prefill {config}: {flops / 1e9:.1f} GFLOP, {moved / 1e6:.1f} MB per call")
        for name, tunables in (variants or {"ours": {}}).items():
            self.timed("prefill", config, name, self.ours(**tunables), problem, 4, moved, flops)
        if variants or self.quick:
            return
        for label, cudnn in self.cudnn_dense(cached, chunk):
            if self.timed("prefill", config, label, cudnn, problem, 4, moved, flops):
                break
        self.timed("prefill", config, "xla", self.xla(), problem, 4, moved, flops)

    def shared_prefix(self, variants: dict[str, dict], cascade_variants: dict[str, dict]) -> None:
        """B4's decode step in three page layouts (module docstring); every layout has the same lengths
        and pool, so only the table differs. Each layout is checked against the XLA reference first."""
        shape = self.shape
        batch, groups = (8, 2) if self.quick else (SHARED_BATCH, SHARED_GROUPS)
        lo, hi = (40, 56) if self.quick else SHARED_LENS
        pps = (64 if self.quick else SHARED_TABLE) // shape.page_size
        shared_pages = (32 if self.quick else SHARED_PREFIX) // shape.page_size
        lens = np.random.default_rng(4).integers(lo, hi + 1, size=batch)
        base = make_problem(shape, lens - 1, 1, pps, 1, seed=4)
        distinct = np.asarray(base.tables[0])
        layouts = {
            "distinct": distinct,
            "shared-adjacent": shared_prefix_table(distinct, groups, shared_pages, interleaved=False),
            "shared-interleaved": shared_prefix_table(distinct, groups, shared_pages, interleaved=True),
        }
        moved = shape.kv_bytes(int(lens.sum()))
        print(f"\n== (c) shared prefixes: B={batch}, lengths {lo}..{hi}, {groups} groups sharing {shared_pages} "
              f"pages, {pps}-page tables; {moved / 1e6:.0f} MB effective K/V per call")
        rows = []
        for layout, table in layouts.items():
            problem = dataclasses.replace(base, tables=[jnp.asarray(table)])
            unique = unique_page_bytes(shape, table, lens)
            self.check(f"decode ours {layout}", self.ours(), problem, reference_f32(problem, shape))
            impls = [(name, self.ours(**tunables)) for name, tunables in variants.items()] + [("xla", self.xla())]
            for name, tunables in cascade_variants.items():
                attend, tiles = self.shared_prefix_attend(table, lens, **tunables)
                print(f"   {layout}: {name} plans {tiles} tiles")
                if name == "cascade":
                    self.check(f"decode cascade {layout}", attend, problem, reference_f32(problem, shape))
                impls.append((name, attend))
            for name, fn in impls:
                # One page set: even the shared layouts read > 3x the L2 in distinct pages per call.
                row = self.timed("decode", f"B={batch} {layout}", name, fn, problem, 4, moved, 0.0,
                                 {"layout": layout, "unique_MB": unique / 1e6})
                if row:
                    rows.append(row)
        print_shared_table(rows)

    def launch_floor(self) -> None:
        """Per-call time of a trivial kernel in the same chained harness: the launch gap alone."""
        problem = make_problem(self.shape, np.array([0]), 1, 1, 1, seed=0)
        self.timed("floor", "B=1", "q*1.0001", lambda q, *_: q * jnp.asarray(1.0001, q.dtype), problem, 8,
                   0, 0.0)

    def copy_bandwidth(self) -> None:
        x = jnp.ones((2**29,), jnp.bfloat16)  # 1 GiB
        scale = jax.jit(lambda a: a * jnp.asarray(1.0001, a.dtype))
        scale(x).block_until_ready()
        samples = []
        for _ in range(10):
            start = time.perf_counter()
            scale(x).block_until_ready()
            samples.append(time.perf_counter() - start)
        seconds = statistics.median(samples)
        tbps = 2 * x.nbytes / seconds / 1e12
        self.record({"kind": "copy", "config": "1 GiB read+write", "impl": "x*c", "us": seconds * 1e6,
                     "MB": 2 * x.nbytes / 1e6, "TBps": tbps, "pct_copy_bw": 100 * tbps / COPY_TBPS})


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def print_table(rows: list[dict]) -> None:
    """Compact table; 'vs xla' and 'vs lib' are speedups of the row over the XLA reference and over the
    library baseline (JAX's Pallas paged decode kernel; cuDNN for prefill) on the same config."""
    print("\n== summary (per call; TB/s = minimum bytes / time; % of the 2.87 TB/s copy bandwidth)")
    print(f"{'kind':8} {'config':22} {'impl':14} {'us':>9} {'TB/s':>6} {'%bw':>5} {'TFLOP/s':>8} "
          f"{'vs xla':>7} {'vs lib':>7}")
    timed = [r for r in rows if "us" in r]
    xla_us = {(r["kind"], r["config"]): r["us"] for r in timed if r["impl"] == "xla"}
    lib_us = {(r["kind"], r["config"]): r["us"] for r in timed if r["impl"] == "library"
              or r["impl"].startswith("cudnn")}
    for r in rows:
        if "check" in r:
            print(f"check    {r['check']:37} {r['result']} rel={r.get('rel_err', float('nan')):.2e}")
            continue
        if "us" not in r:
            print(f"{r['kind']:8} {r['config']:22} {r['impl']:14} {r.get('result', '')}")
            continue
        def ratio(base: float | None, us: float = r["us"]) -> str:
            return f"{base / us:.2f}x" if base else ""

        key = (r["kind"], r["config"])
        tflops = f"{r['TFLOPs']:.0f}" if "TFLOPs" in r else ""
        print(f"{r['kind']:8} {r['config']:22} {r['impl']:14} {r['us']:9.1f} {r['TBps']:6.2f} "
              f"{r['pct_copy_bw']:5.0f} {tflops:>8} {ratio(xla_us.get(key)):>7} {ratio(lib_us.get(key)):>7}")


def print_shared_table(rows: list[dict]) -> None:
    """Effective TB/s (bytes if each row read its own pages), the HBM rate the distinct pages alone would
    need (unique MB / time: if it is over the copy bandwidth, the L2 served the rest), and the speedup
    over the distinct layout for the same implementation."""
    print("\n== shared prefixes (per call)")
    print(f"{'layout':20} {'impl':10} {'us':>8} {'eff TB/s':>9} {'unique MB':>10} {'unique TB/s':>12} "
          f"{'vs distinct':>12}")
    distinct = {r["impl"]: r["us"] for r in rows if r["layout"] == "distinct"}
    for r in rows:
        unique_tbps = r["unique_MB"] * 1e6 / (r["us"] * 1e-6) / 1e12
        speedup = f"{distinct[r['impl']] / r['us']:.2f}x" if r["impl"] in distinct else ""
        print(f"{r['layout']:20} {r['impl']:10} {r['us']:8.1f} {r['TBps']:9.2f} {r['unique_MB']:10.0f} "
              f"{unique_tbps:12.2f} {speedup:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU self-test)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.jsonl")
    parser.add_argument("--shared-prefix", action="store_true", help="only the shared-prefix decode section")
    args = parser.parse_args()
    quick = args.quick
    interpret = quick or jax.default_backend() != "gpu"
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.device_kind} ({jax.default_backend()}), {interpret=}")
    shape = Shape(num_heads=8, num_kv_heads=2, page_size=16) if quick else Shape()
    bench = Bench(shape, args.out, interpret, quick)

    # Split counts around the default (ks4 here); the shared-prefix kernels' prefix splits and block size.
    shared_variants = {"ours": {}, "ks1": {"k_splits": 1}, "ks8": {"k_splits": 8}}
    cascade_variants = {"cascade": {}, "cascade-ps2": {"prefix_splits": 2}, "cascade-ps8": {"prefix_splits": 8},
                        "cascade-ppb2": {"pages_per_block": 2}, "cascade-ks2": {"k_splits": 2},
                        "cascade-w8": {"num_warps": 8}}
    if args.shared_prefix:
        bench.shared_prefix({"ours": {}}, cascade_variants)
        print_table(bench.rows)
        print(f"\ntotal {time.perf_counter() - bench.started:.0f} s")
        return
    bench.correctness()
    if quick:
        bench.decode_config(2, 64, ragged=True)
        bench.prefill_config(32, 32)
        bench.decode_config(2, 32, ragged=False, table_ctx=64,
                            variants={"default": {}, "ks1": {"k_splits": 1}})
        bench.shared_prefix({"ours": {}}, {"cascade": {}})
        print_table(bench.rows)
        return

    print("\n== (b) timing")
    bench.copy_bandwidth()
    bench.launch_floor()
    for batch in (1, 8, 32, 128):
        for ctx in (512, 2048, 8192):
            bench.decode_config(batch, ctx, ragged=False)
    for batch in (8, 32, 128):
        bench.decode_config(batch, 8192, ragged=True)
    for chunk in (512, 2048):
        for cached in (0, 2048):
            bench.prefill_config(chunk, cached)

    # The engine's tables are sized by the session length: short rows in 8192-token tables.
    for batch, ctx, ragged in ((8, 512, False), (128, 512, False), (32, 2048, False), (128, 2048, False),
                               (128, 2048, True)):
        bench.decode_config(batch, ctx, ragged=ragged, table_ctx=8192)

    print("\n== tuning variants: decode split count (ksN) around the default; each 'default' row")
    print("   repeats the main table's (a noise check)")
    for batch, ctx, ragged, table_ctx, splits in (
        (128, 512, False, 8192, (1, 2)),
        (128, 2048, True, 8192, (1, 2)),
        (32, 2048, False, 8192, (2,)),
        (8, 8192, True, None, (16, 32)),
    ):
        variants = {"default": {}, **{f"ks{n}": {"k_splits": n} for n in splits}}
        bench.decode_config(batch, ctx, ragged=ragged, table_ctx=table_ctx, variants=variants)
    bench.shared_prefix(shared_variants, cascade_variants)
    print_table(bench.rows)
    print(f"\ntotal {time.perf_counter() - bench.started:.0f} s")


if __name__ == "__main__":
    main()
