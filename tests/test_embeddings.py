"""Embeddings offline (`Pipeline.embed`) and from the checkpoints embedding models ship: a bare decoder's weights
without the causal LM's "model." prefix under a `*ForCausalLM` config (Qwen3-Embedding's layout), and a bare
`MistralModel` with no LM head at all (e5-mistral's). Each vector is transformers' last hidden state at the
prompt's last token (the bare model's output: after its final norm), at unit length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serving import pipeline
from serving.request import InvalidRequestError
from tests.checkpoints import make_checkpoint
from tests.conftest import TINY_ENGINE_OPTIONS, add_tokenizer
from tests.sentencepiece_tokenizer import VOCAB_SIZE

PROMPTS = [[5, 9, 13, 17, 21], [40] * 35, [7]]


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def last_hidden(model, prompt: list[int]) -> np.ndarray:
    """A transformers model's final-norm output at the prompt's last token."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].numpy()


def test_pipeline_embed_gives_the_last_hidden_state_at_unit_length(tiny_pipe, hf_tiny) -> None:
    vectors = tiny_pipe.embed(PROMPTS)
    for prompt, vector in zip(PROMPTS, vectors, strict=True):
        np.testing.assert_allclose(vector, unit(last_hidden(hf_tiny, prompt)), atol=2e-5)
    first = tiny_pipe.embed("The cat sat.", dimensions=8)  # one prompt: one vector
    want = unit(last_hidden(hf_tiny, tiny_pipe.tokenizer.encode("The cat sat."))[:8])
    np.testing.assert_allclose(first, want, atol=2e-5)
    with pytest.raises(InvalidRequestError, match="session length"):
        tiny_pipe.embed([[5] * 200])
    assert tiny_pipe.engine.wait_idle() and tiny_pipe.engine.stats().num_pages_used == 0


def bare_checkpoint(directory: Path, family: str, architecture: str, sentencepiece_dir: Path, **options) -> Path:
    """A random `family` model whose decoder alone is saved (transformers' `*Model`: no LM head, no "model."
    prefix), its config naming `architecture`, with the test tokenizer."""
    from transformers import AutoModelForCausalLM

    full = make_checkpoint(directory / "full", family, vocab_size=VOCAB_SIZE, **options)
    bare = directory / "bare"
    AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).model.save_pretrained(bare)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    return add_tokenizer(bare, sentencepiece_dir)


@pytest.mark.parametrize("family, architecture, tied", [
    ("qwen3", "Qwen3ForCausalLM", True),  # Qwen3-Embedding: a causal LM's config over the bare decoder's weights
    ("mistral", "MistralModel", False),  # e5-mistral: a bare decoder, its config says so, no head to tie
])
def test_embedding_model_checkpoints_load_and_embed(tmp_path, sentencepiece_dir, family, architecture, tied) -> None:
    from transformers import AutoModel

    checkpoint = bare_checkpoint(tmp_path, family, architecture, sentencepiece_dir, tie_word_embeddings=tied)
    reference = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with pipeline(str(checkpoint), **TINY_ENGINE_OPTIONS) as pipe:
        for prompt, vector in zip(PROMPTS, pipe.embed(PROMPTS), strict=True):
            np.testing.assert_allclose(vector, unit(last_hidden(reference, prompt)), atol=2e-5)
