"""Attention kernels over the paged KV cache, behind one backend switch.

Backends (all with the signature of `paged_attention_reference`, the XLA oracle tests check them against):
    "xla"     portable XLA (CPU, tests, any accelerator): `paged_attention_xla`, which reads the cache only
              up to the batch's longest context.
    "cpu"     decode rows by a native kernel built on first use with the host's C++ compiler
              (`xlkernels.cpu_decode`), everything else as "xla"; "xla" alone where no compiler is found.
    "pallas"  our Pallas GPU kernels (Triton lowering): T == 1 runs the split-K decode kernel, T > 1 the
              paged prefill kernel. T is static under jit, so the choice costs nothing at run time.
    "auto"    "pallas" when JAX's default backend is a GPU, "cpu" on a CPU, else "xla".
    "pallas-interpret"  the Pallas kernels in interpret mode: runs anywhere (slowly); for CPU tests of the
              engine on the kernels' code path.
Every backend reads plain page pools or quantized ones (`xlkernels.kv_quant.QuantizedPages`, `--quant-policy`).
Every backend also takes `shared`, an optional `SharedPrefix` plan for decode batches (see
`xlkernels.shared_prefix`): a hint about how to compute, never a change to what is computed.
Nothing here imports `model` or `serving`: a kernel is usable on its own.

The package itself holds only names (the choices a command line offers) and imports its functions on first
use: the server's process parses options with them before it spawns the engine's, and importing JAX there
would delay the engine's start by its ~1.1 s import.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS = ("xla", "cpu", "pallas", "auto", "pallas-interpret")
# --quant-policy values (LMDeploy's; "fp8" is e4m3) -> the page format; "0" keeps the serving dtype.
KV_FORMATS: dict[str, str | None] = {"0": None, "8": "int8", "4": "int4", "fp8": "fp8"}

# The functions this package exports -> the module defining them, imported on first use (above).
_EXPORTS = {
    "get_paged_attention": "xlkernels.backends",
    "is_pallas": "xlkernels.backends",
    "paged_attention_pallas": "xlkernels.backends",
    "resolve_backend": "xlkernels.backends",
    "paged_attention_reference": "xlkernels.paged_attention",
    "write_kv_pages": "xlkernels.paged_attention",
    "paged_attention_xla": "xlkernels.xla_attention",
    "paged_attention_cpu": "xlkernels.cpu_decode",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'xlkernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = ["BACKENDS", "KV_FORMATS", *_EXPORTS]
