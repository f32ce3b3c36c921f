"""transformers' `generate` on the same prompts: the `--baseline transformers` of bench_engine and bench_serving.

The baseline is what a script calling transformers would get: the model loaded by transformers itself (a
Hugging Face folder, or a GGUF file through its GGUF loader, which dequantizes like xlserve), in the dtype
asked (float32 by default, as xlserve's on CPU), greedy, a static batch (every prompt of the batch left-
padded to the longest and generated together), exactly `output_len` new tokens per prompt.

Two figures, matching the xlserve ones they are set against:
- decode tok/s of one stream, as `bench_engine single` measures it (first token to last): the time of
  `output_len` tokens minus that of 1 token (the prefill), over `output_len - 1`;
- output tok/s of a batch, as `bench_serving` measures it: batch * output_len over the whole `generate`,
  prefill included;
- input tok/s of embeddings (`embed_throughput`): the decoder's forward over the prompts in batches.
"""

from __future__ import annotations

import time
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def load_model(path: str, dtype: str = "float32"):  # -> transformers PreTrainedModel
    """The model as transformers loads it: a checkpoint folder, or a .gguf file (or a folder holding one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.gguf import find_gguf_file

    gguf_file = find_gguf_file(path)
    source = dict(pretrained_model_name_or_path=gguf_file.parent, gguf_file=gguf_file.name) if gguf_file else \
        dict(pretrained_model_name_or_path=Path(path))
    return AutoModelForCausalLM.from_pretrained(**source, dtype=getattr(torch, dtype)).eval()


def generate_seconds(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Wall seconds of one greedy `generate` of exactly `new_tokens` for `prompts` as one static batch."""
    import torch

    longest = max(len(p) for p in prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad)
    return time.perf_counter() - start


def decode_rate(model, prompt: list[int], output_len: int, repeats: int = 2) -> dict:
    """One stream's decode tok/s (first to last token), the best of `repeats`, after a warm-up."""
    generate_seconds(model, [prompt], 4)
    rates = []
    for _ in range(repeats):
        first = generate_seconds(model, [prompt], 1)
        whole = generate_seconds(model, [prompt], output_len)
        rates.append((output_len - 1) / max(whole - first, 1e-9))
    best = max(rates)
    return {"decode_tok_s": best, "ms_per_token": 1e3 / best, "runs_tok_s": rates}


def batch_throughput(model, prompts: list[list[int]], output_len: int, repeats: int = 1) -> dict:
    """Output tok/s of `prompts` generated as one static batch, prefill included: the best of `repeats`."""
    generate_seconds(model, prompts[:1], 4)
    seconds = [generate_seconds(model, prompts, output_len) for _ in range(repeats)]
    best = min(seconds)
    return {"output_tok_s": len(prompts) * output_len / best, "seconds": best, "batch": len(prompts),
            "runs_s": seconds}


def embed_throughput(model, prompts: list[list[int]], batch: int = 32) -> dict:
    """Input tok/s of the decoder's forward over `prompts` in batches of `batch` (what a script embedding with
    transformers runs: the bare decoder, no LM head), and the first batch's last-token hidden states."""
    import torch

    def forward(rows: list[list[int]]):
        longest = max(map(len, rows))
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in rows])  # left-padded: the last token is last
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in rows])
        return model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]

    with torch.inference_mode():
        first = forward(prompts[:batch]).float().numpy()  # warm-up, and the vectors to compare
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            forward(prompts[i : i + batch])
        seconds = time.perf_counter() - start
    return {"input_tok_s": sum(map(len, prompts)) / seconds, "seconds": seconds, "batch": batch,
            "embeddings": list(first)}


def threads() -> int:
    import torch

    return torch.get_num_threads()


def describe(result: dict) -> str:
    if "input_tok_s" in result:
        return (f"{result['input_tok_s']:.0f} input tok/s (batches of {result['batch']}, {result['seconds']:.1f} s; "
                f"unit vectors within {result['max_unit_difference']:.1e} of xlserve's)")
    if "decode_tok_s" in result:
        return f"{result['decode_tok_s']:.1f} tok/s decode ({result['ms_per_token']:.1f} ms/token)"
    return f"{result['output_tok_s']:.1f} output tok/s ({result['batch']} x in {result['seconds']:.1f} s)"

