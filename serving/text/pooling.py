"""What an embedding is made of the engine's answer to an embedding request (`EngineOutput.embedding`, the
final norm's output at the input's last token): that vector, or its first `dimensions` values (models trained
Matryoshka-style keep their meaning in a prefix), scaled to unit length. Shared by POST /v1/embeddings and
`Pipeline.embed`."""

from __future__ import annotations

import numpy as np


def pooled(hidden: list[float] | np.ndarray, dimensions: int | None = None) -> np.ndarray:
    """f32[E] the last token's hidden state -> f32[dimensions or E], unit length (a zero vector stays zero)."""
    vector = np.asarray(hidden, np.float32)[:dimensions]
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
