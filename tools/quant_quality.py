"""What each quantization costs in quality, against the same model unquantized.

    python -m tools.quant_quality --model .models/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m tools.quant_quality --tiny llama qwen3      # the test tier's tiny checkpoints (random weights)

Variants (`--variants`): kv8, kv4, kvfp8 (`--quant-policy 8|4|fp8`), w-int8, w-fp8 (`--weight-quant`),
w-fp8-gpu (fp8 weights computed as on a GPU: products of `weight_quant.NATIVE_FP8_MIN_ROWS` rows or more
run as fp8 x fp8 dots, each activation row rounded to e4m3; the CPU's XLA runs the same arithmetic exactly,
fp8 products accumulated in f32), head-int8 (`--lm-head-quant int8`: a model with a head of its own), and
combinations such as w-int8+kv8 or w-fp8+head-int8. For each:
  logits   one prefill of a fixed text (tools/quant_text.txt, its first `--text-tokens` tokens; random
           tokens for a tiny checkpoint) through the model over a paged cache of the variant's format: the
           max and mean |logit - unquantized logit|, the mean KL(unquantized || variant) per position,
           the text's perplexity, the share of positions whose top token is unchanged ("top-1 same") and
           the widest top-1/top-2 margin of the unquantized logits among those where it changed;
  greedy   `--prompts` prompts (slices of that text, `--prompt-len` tokens each) generating `--tokens`
           greedy tokens each through the engine (the serving path: cache writes, decode and prefill
           attention, the compiled steps), EOS ignored: per prompt, the tokens before the first one that
           differs from the unquantized engine's; reported as a share of all tokens ("agree"), and the
           share of prompts that never differ ("whole").
Runs in float32 on CPU (`--dtype`), so the baseline is the float model and every difference is the
quantization's. Prints one table (markdown) and writes it as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.llama import AttentionBatch, CausalLM, empty_cache
from model.loader import load_params
from model.weight_quant import target_platform
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine, resolve_dtype, with_weight_quant
from serving.request import EngineOutput, GenerationConfig
from xlkernels.kv_quant import kv_format

TEXT_FILE = Path(__file__).with_name("quant_text.txt")
DEFAULT_VARIANTS = ("bf16", "kv8", "kvfp8", "kv4", "w-int8", "w-fp8", "w-fp8-gpu", "w-int8+kv8")
PAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    quant_policy: str = "0"
    weight_quant: str | None = None
    head_quant: str | None = None  # --lm-head-quant (a model with a head of its own)
    bf16: bool = False  # the model computed in bfloat16 instead of --dtype: the yardstick of a rounding change
    gpu: bool = False  # the weights built and multiplied as on a GPU (`weight_quant.target_platform`)

    @classmethod
    def parse(cls, name: str) -> Variant:
        """"kv8" -> KV policy 8; "w-fp8" -> fp8 weights; "head-int8" -> an int8 LM head; "bf16" -> unquantized in
        bfloat16; "+" joins them."""
        policy, weights, head, bf16, gpu = "0", None, None, False, False
        for part in name.split("+"):
            if part.startswith("kv"):
                policy = part.removeprefix("kv")
                kv_format(policy)  # refuse unknown policies by name
            elif part in ("w-int8", "w-fp8", "w-fp8-gpu"):
                weights, gpu = part.removeprefix("w-").removesuffix("-gpu"), part.endswith("-gpu")
            elif part == "head-int8":
                head = "int8"
            elif part == "bf16":
                bf16 = True
            else:
                raise ValueError(f"unknown variant part {part!r} (kv8, kv4, kvfp8, w-int8, w-fp8, w-fp8-gpu, "
                                 "head-int8, bf16)")
        return cls(name, policy, weights, head, bf16, gpu)

    def arithmetic(self) -> contextlib.AbstractContextManager:
        """The context its weights are built and run in: a GPU's (`gpu`), or this machine's."""
        return target_platform("cuda") if self.gpu else contextlib.nullcontext()


def text_logits(config: ModelConfig, params: dict, dtype: jnp.dtype, tokens: np.ndarray, policy: str) -> jax.Array:
    """f32[T, V] logits of every position of `tokens` in one prefill over a cache in `policy`'s format."""
    length = len(tokens)
    pages = -(-length // PAGE_SIZE)
    batch = AttentionBatch(positions=jnp.arange(length, dtype=jnp.int32)[None], valid=jnp.ones((1, length), bool),
                           kv_lens=jnp.array([length], jnp.int32),
                           block_tables=jnp.arange(1, pages + 1, dtype=jnp.int32)[None])
    cache = empty_cache(config, pages + 1, PAGE_SIZE, dtype, kv_format=kv_format(policy))
    model = CausalLM(config, dtype=dtype, attention_backend="xla")
    run = jax.jit(lambda p, c: model.apply({"params": p}, jnp.asarray(tokens, jnp.int32)[None], batch, c)[0])
    return run(params, cache)[0]


def logit_metrics(base: jax.Array, other: jax.Array, tokens: np.ndarray) -> dict:
    """|Δlogit| max and mean, mean KL(base || other), other's perplexity on the text, the share of positions
    whose top token is base's ("top1"), and the widest base margin (top-1 minus top-2 logit) among the
    positions where it is not ("flip_margin": small means only near-ties flip)."""
    top2 = jax.lax.top_k(base, 2)[0]
    flipped = jnp.argmax(other, axis=-1) != jnp.argmax(base, axis=-1)
    log_base, log_other = jax.nn.log_softmax(base, axis=-1), jax.nn.log_softmax(other, axis=-1)
    kl = jnp.sum(jnp.exp(log_base) * (log_base - log_other), axis=-1)
    nll = -jnp.take_along_axis(log_other[:-1], jnp.asarray(tokens[1:], jnp.int32)[:, None], axis=-1)
    delta = jnp.abs(other - base)
    return {"max_abs_dlogit": float(delta.max()), "mean_abs_dlogit": float(delta.mean()), "kl": float(kl.mean()),
            "ppl": float(jnp.exp(nll.mean())), "top1": float(1 - flipped.mean()),
            "flip_margin": float(jnp.where(flipped, top2[:, 0] - top2[:, 1], 0.0).max())}


def greedy_tokens(config: ModelConfig, params: dict, tokenizer, variant: Variant, prompts: list[list[int]],
                  num_tokens: int, dtype_name: str) -> list[list[int]]:
    """Each prompt's `num_tokens` greedy tokens through an engine of the variant's KV format."""
    longest = max(map(len, prompts)) + num_tokens
    session = -(-longest // PAGE_SIZE) * PAGE_SIZE
    options = EngineConfig(page_size=PAGE_SIZE, session_len=session, num_pages=len(prompts) * session // PAGE_SIZE + 2,
                           decode_batch_buckets=(len(prompts),), prefill_row_buckets=(4,),
                           prefill_token_buckets=(64,), max_prefill_token_num=256, dtype=dtype_name,
                           attention_backend="xla", quant_policy=variant.quant_policy, preset="test")
    engine = Engine(config, params, tokenizer, options)
    engine.start()
    try:
        outputs: list[list[int]] = [[] for _ in prompts]
        done = threading.Semaphore(0)
        greedy = GenerationConfig(max_new_tokens=num_tokens, ignore_eos=True, do_sample=False)

        def sink_for(i: int):
            def sink(out: EngineOutput) -> None:
                outputs[i].extend(out.new_token_ids)
                if out.finished:
                    done.release()
            return sink

        for i, prompt in enumerate(prompts):
            engine.submit(engine.make_request(prompt, greedy, f"quality-{variant.name}-{i}"), sink_for(i))
        for _ in prompts:
            done.acquire()
        return outputs
    finally:
        engine.shutdown()


def agreement(base: list[list[int]], other: list[list[int]]) -> dict:
    """Tokens before each prompt's first divergence, as a share of all tokens; prompts that never diverge."""
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
              for x, y in zip(base, other, strict=True)]
    total = sum(map(len, base))
    return {"agree": sum(prefix) / total, "whole": sum(p == len(x) for p, x in zip(prefix, base, strict=True))
            / len(base)}


def evaluate(name: str, path: Path, variants: list[Variant], args: argparse.Namespace, tokenizer) -> list[dict]:
    """Every variant of one model against its unquantized self."""
    platform = jax.devices()[0].platform
    base_config = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(args.dtype, base_config, platform)
    if tokenizer is not None:
        text = tokenizer.encode(TEXT_FILE.read_text())
    else:  # a tiny random checkpoint: no language to read, random token ids instead
        text = np.random.default_rng(0).integers(0, base_config.vocab_size, args.text_tokens + 2048).tolist()
    text = np.asarray(text[: args.text_tokens])
    stride = max(1, (len(text) - args.prompt_len) // args.prompts)
    prompts = [text[i * stride : i * stride + args.prompt_len].tolist() for i in range(args.prompts)]
    loaded: dict[tuple[str | None, str | None, jnp.dtype, bool], dict] = {}

    def params_for(variant: Variant) -> tuple[ModelConfig, dict, jnp.dtype]:
        config = with_weight_quant(base_config, variant.weight_quant, variant.head_quant)
        run_dtype = jnp.dtype(jnp.bfloat16 if variant.bf16 else dtype)
        key = (variant.weight_quant, variant.head_quant, run_dtype, variant.gpu)
        if key not in loaded:
            loaded[key] = load_params(path, config, run_dtype)
        return config, loaded[key], run_dtype

    base = Variant("none")
    config, params, _ = params_for(base)
    base_logits = text_logits(config, params, dtype, text, "0")
    base_tokens = greedy_tokens(config, params, tokenizer, base, prompts, args.tokens, jnp.dtype(dtype).name)
    rows = [{"model": name, "variant": "none", **logit_metrics(base_logits, base_logits, text), "agree": 1.0,
             "whole": 1.0}]
    for variant in variants:
        began = time.perf_counter()
        with variant.arithmetic():
            config, params, run_dtype = params_for(variant)
            logits = text_logits(config, params, run_dtype, text, variant.quant_policy).astype(jnp.float32)
            tokens = greedy_tokens(config, params, tokenizer, variant, prompts, args.tokens, run_dtype.name)
        metrics = logit_metrics(base_logits, logits, text)
        rows.append({"model": name, "variant": variant.name, **metrics, **agreement(base_tokens, tokens)})
        print(f"{name} {variant.name}: {rows[-1]} ({time.perf_counter() - began:.0f}s)", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | variant | max abs Δlogit | mean abs Δlogit | KL | perplexity | top-1 same | widest flipped "
             "margin | greedy agree | whole prompts |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['max_abs_dlogit']:.4f} | {r['mean_abs_dlogit']:.5f} | "
                     f"{r['kl']:.2e} | {r['ppl']:.3f} | {100 * r['top1']:.1f}% | {r['flip_margin']:.3f} | "
                     f"{100 * r['agree']:.1f}% | {100 * r['whole']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a checkpoint folder or GGUF file (its tokenizer reads the fixed text)")
    source.add_argument("--tiny", nargs="+", metavar="FAMILY", help="tiny random checkpoints of these families "
                        "(tests/checkpoints.py), read with random token ids")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    variants = [Variant.parse(v) for v in args.variants]
    rows = []
    if args.model:
        from serving.text.tokenizer import Tokenizer

        rows += evaluate(Path(args.model).name, Path(args.model), variants, args, Tokenizer.from_pretrained(args.model))
    else:
        from tests.checkpoints import make_checkpoint

        with tempfile.TemporaryDirectory() as scratch:
            for family in args.tiny:
                path = make_checkpoint(Path(scratch) / family, family, vocab_size=512, max_position_embeddings=256)
                rows += evaluate(f"tiny-{family}", path, variants, args, None)
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    assert all(math.isfinite(r["ppl"]) for r in rows), "a variant produced non-finite logits"


if __name__ == "__main__":
    main()
