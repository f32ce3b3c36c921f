"""xlserve's serving side: the offline pipeline, the engine, the text layer and the HTTP server.

`pipeline`, `Pipeline`, `Response` and `GenerationConfig` are loaded on first use, so importing a
light module such as `serving.text.stop` does not pull in JAX and the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationConfig": "serving.request",
    "Pipeline": "serving.offline",
    "Response": "serving.offline",
    "pipeline": "serving.offline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
