"""Shared fixtures: a trained SentencePiece tokenizer, one tiny Llama checkpoint with it, and one engine over it.

Start-up compiles every bucket, so the suite builds as few engines as it can: `tiny_pipe` is shared
by every engine test and uses the small `test` bucket preset and a deliberately small KV cache (so
that many concurrent requests force preemption while a few never do).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.sentencepiece_tokenizer import VOCAB_SIZE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One compilation cache and program store for the run (serving/engine/compile_cache.py, program_store.py), new
# each run: the first engine of a model and shapes compiles its programs, every later one loads them, in this
# process and in the servers it starts (they inherit the variable), the way a restarted server does. A test of
# compiling itself passes compilation_cache_dir="off" (or its own directory).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xlserve-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]

# The engine fixture's cache: 24 usable pages of 16 tokens = 384 tokens.
TINY_ENGINE_OPTIONS = dict(preset="test", page_size=16, num_pages=25, session_len=128)


def add_tokenizer(checkpoint: Path, tokenizer_dir: Path) -> Path:
    """Copy the tokenizer files of `tokenizer_dir` into a checkpoint folder."""
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, checkpoint / file.name)
    return checkpoint


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A Llama-2-style SentencePiece tokenizer (byte fallback, chat template), trained once a run."""
    from tests.sentencepiece_tokenizer import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, sentencepiece_dir) -> Path:
    """A tiny random Llama (GQA 4/2, untied, f32) with the SentencePiece tokenizer (VOCAB_SIZE tokens)."""
    from tests.checkpoints import make_llama_checkpoint

    path = make_llama_checkpoint(tmp_path_factory.mktemp("tiny-llama"), vocab_size=VOCAB_SIZE,
                                 max_position_embeddings=256)
    return add_tokenizer(Path(path), sentencepiece_dir)


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
