"""End-to-end greedy parity of two attention backends on the same weights (the GPU gate for a kernel).

    python -m tools.check_backend_parity --shape llama3-8b --backends xla,pallas --num-prompts 32
    python -m tools.check_backend_parity --shape llama3-8b --weights copy --num-prompts 32

Runs the same prompts through two engines that share one set of weights and reports, per prompt,
whether the greedy tokens agree and where they first diverge. Then it explains the disagreements with
logits: each backend's model computes the first two steps of every prompt (the prefill, then one decode
step fed the same token) next to an f32 oracle (the XLA path with f32 weights, cache and matmuls), and
the report gives each backend's logit error against the oracle and, where the backends pick different
tokens, how far apart the oracle puts those two tokens. A kernel as exact as the reference has an
error like the reference's, and flips only tokens whose gap is within that error (near ties).

Weights (`--weights`):
    random  N(0, 0.02), as the benchmarks use. Their logits are nearly Gaussian over 128k tokens, so the
            top two are typically a few tenths apart and bf16 rounding flips near ties.
    copy    random weights plus a previous-token circuit in layer 0 that decides the output with a large
            margin: the model predicts the token before the last, so greedy output alternates the
            prompt's last two tokens. The circuit lives in attention: the query and key are constant
            vectors rotated so that RoPE peaks the score at the previous position, the value carries
            the token's embedding, and the LM head reads it back. Only an attention that finds the
            right key (right page, right mask, right length) gives the right token; rounding cannot
            flip it. Scaling the LM head would not do: it scales the logit errors with the gaps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from configs.shapes import SHAPES
from model.config import ModelConfig
from model.llama import AttentionBatch, CausalLM
from model.loader import init_random_params
from model.rope import inv_frequencies
from model.sharding import make_mesh
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine, resolve_dtype
from serving.request import GenerationConfig
from tools.bench_engine import run_requests

PAGE_SIZE = 64
PROBE_ROWS = 8  # prompts per probe call: the XLA reference's scores are [rows, 32, T, T] f32 per layer
# The previous-token circuit: RoPE pairs it uses (the fastest-turning ones), how many nats its
# attention score at the previous position beats any other visible position by, and the weight of
# the copied embedding in the residual against the last token's own.
COPY_PAIRS = 16
COPY_SCORE_MARGIN = 24.0
COPY_GAIN = 8.0
# Every other layer's output projections (attention and MLP) are scaled by this: at full scale 31
# random layers outgrow the circuit and pull most prompts to a few attractor tokens (measured on the
# H100: 7/32 prompts alternated), so attention would no longer decide the token.
RANDOM_LAYER_SCALE = 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--backends", default="xla,pallas")
    parser.add_argument("--weights", default="random", choices=("random", "copy"))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-logits", action="store_true", help="only compare tokens (no logit probe)")
    parser.add_argument("--json", help="also write the per-prompt results to this file")
    args = parser.parse_args()

    model_config = SHAPES[args.shape]
    dtype = resolve_dtype("auto", model_config, jax.devices()[0].platform)
    mesh = make_mesh(1)
    params = init_random_params(model_config, dtype, seed=0, mesh=mesh)
    if args.weights == "copy":
        params = with_previous_token_circuit(model_config, params, max_len=1024)
    rng = np.random.default_rng(0)
    prompts = [
        rng.integers(0, model_config.vocab_size, size=int(n)).tolist()
        for n in rng.integers(8, 600, size=args.num_prompts)
    ]
    backends = args.backends.split(",")
    tokens = {
        backend: engine_tokens(model_config, params, backend, prompts, args.max_new_tokens) for backend in backends
    }
    report: dict = {
        "shape": args.shape,
        "weights": args.weights,
        "device": jax.devices()[0].device_kind,
        "backends": backends,
        "prompts": [len(p) for p in prompts],
        "tokens": tokens,
    }
    print_token_report(args, prompts, backends, tokens)
    if args.weights == "copy":  # the circuit's output: the prompt's last two tokens, alternating
        follow = {
            b: sum(
                t == [p[-2], p[-1]] * (len(t) // 2) + p[-2:-1] * (len(t) % 2)
                for p, t in zip(prompts, tokens[b], strict=True)
            )
            for b in backends
        }
        print(
            "  prompts whose output alternates their last two tokens: "
            + ", ".join(f"{b} {n}/{len(prompts)}" for b, n in follow.items())
        )
        report["copy_followed"] = follow
    if not args.no_logits:
        probes = probe_all(model_config, params, dtype, backends, prompts)
        report["logits"] = logit_report(backends, probes, tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


# ----- the end-to-end gate ---------------------------------------------------------------------------


def engine_tokens(
    config: ModelConfig, params: dict, backend: str, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy tokens of every prompt through a real engine (chunked prefill, paged decode, sampler)."""
    # Few shapes, so each engine compiles in seconds: one decode batch for all prompts, small chunks.
    options = EngineConfig(
        session_len=1024,
        num_pages=1024,
        page_size=PAGE_SIZE,
        decode_batch_buckets=(len(prompts),),
        prefill_row_buckets=(1, 4),
        prefill_token_buckets=(128, 512),
        max_prefill_token_num=2048,
        attention_backend=backend,
    )
    engine = Engine(config, params, None, options, mesh=make_mesh(1))
    engine.start()
    try:
        records = run_requests(engine, prompts, GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True))
    finally:
        engine.shutdown()
    return [record["tokens"] for record in records]


def print_token_report(
    args: argparse.Namespace, prompts: list[list[int]], backends: list[str], tokens: dict[str, list[list[int]]]
) -> None:
    first, second = (tokens[b] for b in backends)
    same = sum(a == b for a, b in zip(first, second, strict=True))
    print(
        f"{args.shape} ({args.weights} weights) on {jax.devices()[0].device_kind}: {same}/{len(prompts)} prompts "
        f"give identical greedy tokens ({args.max_new_tokens} each) with {' and '.join(backends)}"
    )
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a != b:
            at = next(k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            print(f"  prompt {i} ({len(prompts[i])} tokens) first differs at output token {at}")


# ----- the logit probe ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    prefill: np.ndarray  # f32[N, V] logits at each prompt's last token
    decode: np.ndarray  # f32[N, V] logits of the next step, fed the oracle's greedy token


def probe_all(
    config: ModelConfig, params: dict, dtype: jnp.dtype, backends: list[str], prompts: list[list[int]]
) -> dict[str, Probe]:
    """The first two steps' logits of every prompt under the oracle and under each backend."""
    width = -(-max(len(p) for p in prompts) // PAGE_SIZE) * PAGE_SIZE
    padded = [prompts[i : i + PROBE_ROWS] for i in range(0, len(prompts), PROBE_ROWS)]
    runs = {"oracle": ("xla", jnp.float32)} | {backend: (backend, dtype) for backend in backends}
    prefill_fns = {name: prefill_fn(config, backend, run_dtype, width) for name, (backend, run_dtype) in runs.items()}
    decode_fns = {name: decode_fn(config, backend, run_dtype) for name, (backend, run_dtype) in runs.items()}
    out: dict[str, tuple[list, list]] = {name: ([], []) for name in runs}
    for group in padded:
        tokens = np.zeros((len(group), width), np.int32)
        for row, prompt in enumerate(group):
            tokens[row, : len(prompt)] = prompt
        lens = np.array([len(p) for p in group], np.int32)
        next_tokens = None
        for name in runs:  # the oracle first: its greedy token feeds every decode step
            logits, cache = prefill_fns[name](params, tokens, lens)
            next_tokens = np.asarray(logits).argmax(-1).astype(np.int32) if next_tokens is None else next_tokens
            out[name][0].append(np.asarray(logits))
            out[name][1].append(np.asarray(decode_fns[name](params, cache, next_tokens, lens)))
    return {name: Probe(np.concatenate(pre), np.concatenate(dec)) for name, (pre, dec) in out.items()}


def probe_batch(lens: jax.Array, width: int, start: jax.Array | None = None) -> AttentionBatch:
    """Rows of `width` tokens from `start` (default 0) over a fresh table per row: row b owns pages
    1 + b * pages .. (page 0 is the null page)."""
    rows = lens.shape[0]
    pages = -(-(width + 1) // PAGE_SIZE)  # room for the decode token
    offsets = jnp.arange(width, dtype=jnp.int32)
    if start is None:
        positions, valid, kv_lens = jnp.broadcast_to(offsets, (rows, width)), offsets < lens[:, None], lens
    else:
        positions, valid, kv_lens = start[:, None] + offsets, jnp.ones((rows, width), bool), start + width
    tables = 1 + jnp.arange(rows * pages, dtype=jnp.int32).reshape(rows, pages)
    return AttentionBatch(positions=positions, valid=valid, kv_lens=kv_lens, block_tables=tables)


def prefill_fn(config: ModelConfig, backend: str, dtype: jnp.dtype, width: int):
    model = CausalLM(config, dtype=dtype, attention_backend=backend)

    @jax.jit
    def prefill(params: dict, tokens: jax.Array, lens: jax.Array) -> tuple[jax.Array, list]:
        rows = tokens.shape[0]
        pages = 1 + rows * -(-(width + 1) // PAGE_SIZE)
        shape = (config.num_kv_heads, pages, PAGE_SIZE, config.head_dim)
        cache = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]
        with oracle_precision(dtype):
            return model.apply({"params": cast(params, dtype)}, tokens, probe_batch(lens, width), cache, lens - 1)

    return prefill


def decode_fn(config: ModelConfig, backend: str, dtype: jnp.dtype):
    model = CausalLM(config, dtype=dtype, attention_backend=backend)

    @jax.jit
    def decode(params: dict, cache: list, tokens: jax.Array, lens: jax.Array) -> jax.Array:
        batch = probe_batch(lens, 1, start=lens)
        with oracle_precision(dtype):
            logits, _ = model.apply(
                {"params": cast(params, dtype)}, tokens[:, None], batch, cache, jnp.zeros_like(lens)
            )
        return logits

    return decode


def oracle_precision(dtype: jnp.dtype) -> contextlib.AbstractContextManager:
    """f32 matmuls at full f32 precision (GPUs would use TF32); the backends under test keep their defaults."""
    return jax.default_matmul_precision("highest") if dtype == jnp.float32 else contextlib.nullcontext()


def cast(params: dict, dtype: jnp.dtype) -> dict:
    return jax.tree.map(lambda a: a.astype(dtype), params)


def logit_report(backends: list[str], probes: dict[str, Probe], tokens: dict[str, list[list[int]]]) -> dict:
    """Print and return, per step, each backend's error against the oracle and every argmax disagreement."""
    report = {}
    for step in ("prefill", "decode"):
        oracle = getattr(probes["oracle"], step)
        top2 = np.sort(oracle, axis=-1)[:, -2:]
        gaps = top2[:, 1] - top2[:, 0]
        lines = {"oracle_top2_gap": summary(gaps)}
        picks = {}
        for backend in backends:
            logits = getattr(probes[backend], step)
            err = np.abs(logits - oracle).max(-1)
            rel = np.linalg.norm(logits - oracle, axis=-1) / np.linalg.norm(oracle, axis=-1)
            picks[backend] = logits.argmax(-1)
            lines[backend] = {
                "max_abs_err": summary(err),
                "rel_err": summary(rel),
                "argmax_equals_oracle": int((picks[backend] == oracle.argmax(-1)).sum()),
            }
        a, b = backends
        between = np.abs(getattr(probes[a], step) - getattr(probes[b], step)).max(-1)
        lines[f"{a}_vs_{b}_max_abs"] = summary(between)
        flips = []
        for i in np.nonzero(picks[a] != picks[b])[0]:
            ta, tb = int(picks[a][i]), int(picks[b][i])
            errors = {k: float(np.abs(getattr(probes[k], step)[i] - oracle[i]).max()) for k in backends}
            apart = float(abs(oracle[i, ta] - oracle[i, tb]))
            flips.append(
                {
                    "prompt": int(i),
                    a: ta,
                    b: tb,
                    "oracle_gap_between_them": apart,
                    "max_abs_err": errors,
                    "oracle_top2_gap": float(gaps[i]),
                }
            )
        lines["disagreements"] = flips
        report[step] = lines
        print(f"{step} logits over {len(oracle)} prompts (vs the f32 oracle): oracle top-1/top-2 gap {fmt(gaps)}")
        for backend in backends:
            rel = lines[backend]["rel_err"]
            print(
                f"  {backend}: max |err| {fmt(getattr(probes[backend], step) - oracle, axis=-1)}; "
                f"rel err median {rel['median']:.2e}, max {rel['max']:.2e}; "
                f"argmax = oracle's for {lines[backend]['argmax_equals_oracle']}/{len(oracle)}"
            )
        print(f"  {a} vs {b}: max |diff| {fmt(between)}; {len(flips)} argmax disagreements")
        for flip in flips:
            print(
                f"    prompt {flip['prompt']}: {a} picks {flip[a]}, {b} picks {flip[b]}; the oracle puts them "
                f"{flip['oracle_gap_between_them']:.4f} apart; errors "
                + ", ".join(f"{k} {v:.4f}" for k, v in flip["max_abs_err"].items())
            )
    if all(len(t) for t in tokens.values()):
        for backend in backends:
            engine_first = np.array([t[0] for t in tokens[backend]])
            same = int((engine_first == probes[backend].prefill.argmax(-1)).sum())
            print(f"  {backend}: the engine's first token equals this probe's argmax for {same}/{len(engine_first)}")
            report[f"{backend}_engine_first_equals_probe"] = same
    return report


def summary(values: np.ndarray) -> dict:
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def fmt(values: np.ndarray, axis: int | None = None) -> str:
    values = np.abs(values).max(axis=axis) if axis is not None else values
    return f"min {np.min(values):.4f} / median {np.median(values):.4f} / max {np.max(values):.4f}"


# ----- peaked weights --------------------------------------------------------------------------------------


def with_previous_token_circuit(config: ModelConfig, params: dict, max_len: int, seed: int = 1) -> dict:
    """`params` with layer 0's attention, the embeddings and the LM head rebuilt as a previous-token copier.

    Residual layout: dims [0, D) hold a constant u (every token's), dims [D, D + Hkv * D) the token's
    random content c (each row scaled to |c| = |u|), the rest 0. So layer 0's RMSNorm maps u to a
    constant per dim (4.0 at Llama-3-8B's shape), from which W_q and W_k make constant q and k vectors;
    k is rotated one RoPE step back into q, so q_m . k_n = a^2 sum_i cos((n - m + 1) theta_i): largest
    at n = m - 1. Each KV head's value is its D-slice of the content, written back to the same dims by the group's first
    query head with weight COPY_GAIN; the LM head is the content, so the copied token's logit is
    COPY_GAIN * sqrt(2) times the last token's own and far above any random cross term.
    """
    e, d, kv, g, vocab = config.hidden_size, config.head_dim, config.num_kv_heads, config.q_per_kv, config.vocab_size
    content = kv * d
    if e < d + content or config.tie_word_embeddings:
        raise ValueError(f"the circuit needs an untied LM head and hidden_size >= {d + content}")
    dtype = params["embed"]["embedding"].dtype
    key = jax.random.key(seed)
    c = jax.random.normal(key, (vocab, content), jnp.float32)
    c = c * (np.sqrt(d * 8.0) / jnp.linalg.norm(c, axis=-1, keepdims=True))  # |c| = |u| = sqrt(8 d)
    embedding = jnp.zeros((vocab, e), jnp.float32).at[:, :d].set(np.sqrt(8.0)).at[:, d : d + content].set(c)
    lm_head = jnp.zeros((e, vocab), jnp.float32).at[d : d + content].set(c.T)

    theta = inv_frequencies(config.rope, d)[:COPY_PAIRS]
    amplitude = np.sqrt(COPY_SCORE_MARGIN * np.sqrt(d) / score_margin(theta, max_len))
    half = d // 2
    k_vec = np.zeros(d, np.float32)
    k_vec[: len(theta)] = amplitude
    q_vec = np.zeros(d, np.float32)  # k rotated by one step back: [k1 cos + k2 sin, k2 cos - k1 sin], k2 = 0
    q_vec[: len(theta)] = amplitude * np.cos(theta)
    q_vec[half : half + len(theta)] = -amplitude * np.sin(theta)
    normed_u = np.sqrt(8.0) / np.sqrt(16.0 * d / e)  # u after layer 0's RMSNorm: rms = sqrt((|u|^2 + |c|^2) / e)
    wqkv = np.zeros((e, kv, g + 2, d), np.float32)
    wqkv[:d, :, :g, :] = q_vec / (d * normed_u)
    wqkv[:d, :, g, :] = k_vec / (d * normed_u)
    wo = np.zeros((kv * g, d, e), np.float32)
    for h in range(kv):
        wqkv[d + h * d + np.arange(d), h, g + 1, np.arange(d)] = 1.0
        wo[h * g, np.arange(d), d + h * d + np.arange(d)] = COPY_GAIN / normed_u

    def place(new: jax.Array | np.ndarray, old: jax.Array) -> jax.Array:
        return jax.device_put(jnp.asarray(new, dtype), old.sharding)

    def quieter(layer: dict) -> dict:
        attn, mlp = layer["attn"], layer["mlp"]
        return {
            **layer,
            "attn": {**attn, "wo": attn["wo"] * RANDOM_LAYER_SCALE},
            "mlp": {**mlp, "w_down": mlp["w_down"] * RANDOM_LAYER_SCALE},
        }

    layers = {f"layers_{i}": quieter(params[f"layers_{i}"]) for i in range(1, config.num_layers)}
    layer0 = quieter(params["layers_0"])
    attn = layer0["attn"]
    layer0["attn"] = {**attn, "wqkv": place(wqkv, attn["wqkv"]), "wo": place(wo, attn["wo"])}
    return {
        **params,
        **layers,
        "layers_0": layer0,
        "embed": {"embedding": place(embedding, params["embed"]["embedding"])},
        "lm_head": {"kernel": place(lm_head, params["lm_head"]["kernel"])},
    }


def score_margin(theta: np.ndarray, max_len: int) -> float:
    """Smallest sum_i (1 - cos(delta theta_i)) over the offsets delta != 0 a visible key can have."""
    deltas = np.arange(-max_len, 2)
    deltas = deltas[deltas != 0]
    return float((1.0 - np.cos(deltas[:, None] * theta[None, :])).sum(-1).min())


if __name__ == "__main__":
    main()
