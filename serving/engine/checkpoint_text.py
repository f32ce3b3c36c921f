"""What the engine reads of a checkpoint besides its weights: its tokenizer, and the stop ids of every request.

The text layer cannot look into a model folder for a GGUF file (it does not import `model`), so the engine
finds it and hands it over. The tokenizer is imported on first call: it pulls in transformers (and torch),
which an engine process that never needs it should not pay for at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model.config import ModelConfig
from model.gguf import find_gguf_file

if TYPE_CHECKING:
    from serving.text.tokenizer import Tokenizer


def load_tokenizer(model_path: str) -> Tokenizer:
    """The checkpoint's tokenizer: a Hugging Face folder's, or a GGUF file's (the file, or one in the folder)."""
    from serving.text.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model_path, find_gguf_file(model_path))


def stop_ids(model_config: ModelConfig, tokenizer: Tokenizer | None) -> frozenset[int]:
    """config.json's EOS ids and the tokenizer's (read from it only when a tokenizer is given)."""
    return frozenset(model_config.eos_token_ids) | (tokenizer.eos_token_ids if tokenizer is not None else frozenset())
