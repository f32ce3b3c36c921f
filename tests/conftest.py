"""Shared fixtures: one tiny Llama checkpoint with a real tokenizer, and one engine over it.

Start-up compiles every bucket, so the suite builds as few engines as it can: `tiny_pipe` is shared
by every engine test and uses the small `test` bucket preset and a deliberately small KV cache (so
that many concurrent requests force preemption while a few never do).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "models" / "llama2-tokenizer"

# The engine fixture's cache: 24 usable pages of 16 tokens = 384 tokens.
TINY_ENGINE_OPTIONS = dict(preset="test", page_size=16, num_pages=25, session_len=128)


def add_llama2_tokenizer(checkpoint: Path) -> Path:
    if not LLAMA2_TOKENIZER.is_dir():
        pytest.skip(f"the Llama 2 tokenizer is expected at {LLAMA2_TOKENIZER}")
    for file in LLAMA2_TOKENIZER.iterdir():
        shutil.copy(file, checkpoint / file.name)
    return checkpoint


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA 4/2, untied, f32) with the Llama 2 tokenizer (32000 tokens)."""
    from tests.checkpoints import make_llama_checkpoint

    path = make_llama_checkpoint(tmp_path_factory.mktemp("tiny-llama"), vocab_size=32000,
                                 max_position_embeddings=256)
    return add_llama2_tokenizer(Path(path))


@pytest.fixture(scope="session")
def hf_tiny(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_llama):
    from serving import pipeline

    pipe = pipeline(str(tiny_llama), **TINY_ENGINE_OPTIONS)
    yield pipe
    pipe.close()
