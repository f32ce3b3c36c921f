"""Decode attention on CPU by a native kernel (`cpu_decode.cc`), built on first use with the host's C++
compiler against the XLA FFI headers jaxlib ships, and cached.

`paged_attention_cpu` is the "cpu" backend: one query token per row over plain float32 pages runs the
native kernel, which reads each key and value once straight from the page pool; everything else (prompt
chunks, quantized pages, other dtypes, a host without a compiler) runs `paged_attention_xla`. Same
contract and, up to float rounding, the same numbers as the reference.

The library is built once per source, jaxlib and CPU (`-march=native`: a cache shared between machines
keeps one library per instruction set) under `$XDG_CACHE_HOME/xlserve/native` (else ~/.cache), written
to a temporary name and renamed, so processes starting together never load a half-written file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xlkernels.kv_quant import Pages, QuantizedPages
from xlkernels.shared_prefix import SharedPrefix
from xlkernels.xla_attention import paged_attention_xla

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.cc")
TARGET = "xlserve_paged_decode_f32"
SYMBOL = "XlservePagedDecodeF32"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "xlserve" / "native"


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (what -march=native compiles for), or the machine's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def library_path() -> Path:
    """Where the library for this source, jaxlib, compiler flags and CPU lives (built or not)."""
    import jaxlib  # its headers are what the library is compiled against

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()):
        key.update(part)
    return cache_dir() / f"cpu_decode-{key.hexdigest()[:16]}.so"


def build(path: Path) -> None:
    """Compile the kernel into `path` (raises OSError or CalledProcessError when it cannot)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler (c++, g++ or clang++) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = Path(scratch) / path.name
        subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)],
                       check=True, capture_output=True, text=True)
        os.replace(partial, path)


@functools.cache
def native_kernel_ready() -> bool:
    """Whether the native kernel is registered with XLA:CPU, building it first if needed (once a process).
    False, with one warning, where it cannot be built or loaded: attention then runs in XLA."""
    import ctypes

    path = library_path()
    try:
        if not path.exists():
            build(path)
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, SYMBOL)), platform="cpu")
    except (OSError, AttributeError, subprocess.CalledProcessError) as exc:
        detail = exc
        if isinstance(exc, subprocess.CalledProcessError):  # the compiler's errors, not its notes
            detail = "\n".join(line for line in exc.stderr.splitlines() if "error" in line)[:2000]
        logger.warning("CPU decode attention runs in XLA: the native kernel could not be built or loaded (%s)",
                       detail)
        return False
    return True


def native_decode_applies(q: jax.Array, k_pages: Pages) -> bool:
    """Whether `paged_attention_cpu` runs these operands natively: one plain float32 query token per row, on
    a host whose JAX runs on its CPU (the kernel is registered for XLA:CPU only)."""
    return (q.shape[1] == 1 and not isinstance(k_pages, QuantizedPages) and q.dtype == jnp.float32
            and k_pages.dtype == jnp.float32 and jax.default_backend() == "cpu" and native_kernel_ready())


def paged_attention_cpu(
    q: jax.Array,  # [B, T, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, T]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    shared: SharedPrefix | None = None,
) -> jax.Array:  # [B, T, Hq, D] in q.dtype
    """`paged_attention_reference`'s contract: the native kernel for decode rows, else `paged_attention_xla`."""
    if not native_decode_applies(q, k_pages):
        return paged_attention_xla(q, k_pages, v_pages, block_tables, q_positions, kv_lens, scale=scale)
    batch, _, num_heads, head_dim = q.shape
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((batch, num_heads, head_dim), jnp.float32),
                            vmap_method="sequential")
    out = call(q[:, 0], k_pages, v_pages, block_tables, q_positions[:, 0], kv_lens, scale=np.float32(scale))
    return out[:, None]
