"""The native CPU kernels (`cpu_decode.cc`: decode attention, `cpu_matmul.cc`: few-row products,
`cpu_blocks.cc`: products over GGUF blocks), built on
first use with the host's C++ compiler against the XLA FFI headers jaxlib ships into one library, cached,
loaded and registered with XLA:CPU.

The library is built once per set of sources, jaxlib, flags and CPU (`-march=native`: a cache shared
between machines keeps one library per instruction set) under `$XDG_CACHE_HOME/xlserve/native` (else
~/.cache), written to a temporary name and renamed, so processes starting together never load a
half-written file. The sources compile in parallel (one compiler per source, then one link): the first
start of a server overlaps this build, and two sources in a row would double it.

Without a compiler (or where the build fails) `native_kernels_ready` is False, with one warning, and the
callers keep to XLA (attention's loop, XLA's dots).
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

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = (_HERE / "cpu_decode.cc", _HERE / "cpu_matmul.cc", _HERE / "cpu_blocks.cc")
# Included by the sources: part of the library's key.
HEADERS = (_HERE / "native_tasks.h", _HERE / "native_bf16.h", _HERE / "native_simd.h", _HERE / "native_tiles.h")
# XLA FFI target name -> the handler symbol the library exports.
TARGETS = {"xlserve_paged_decode_f32": "XlservePagedDecodeF32", "xlserve_paged_decode_bf16": "XlservePagedDecodeBf16",
           "xlserve_rows_matmul_f32": "XlserveRowsMatmulF32", "xlserve_row_matmul_bf16": "XlserveRowMatmulBf16",
           **{f"xlserve_blocks_{op}_{kind}": f"XlserveBlocks{op.title()}{kind.upper()}"
              for op in ("matmul", "decode") for kind in ("q4_0", "q4_1", "q8_0")}}
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-fPIC")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "xlserve" / "native"


@functools.cache  # read for the library's key and for the default weight format, once
def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (what -march=native compiles for), or the machine's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU multiplies bfloat16 on AMX tiles (`amx_bf16`), where XLA:CPU's bf16 dots run ~2.8x its
    f32 ones at 16 rows (docs/perf-notes.md, "Twelfth session") and the GGUF blocks' products use the tiles."""
    return "amx_bf16" in _cpu_flags().split()


def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 (its foundation, `avx512f`): 16 float32 lanes a vector register."""
    return "avx512f" in _cpu_flags().split()


def cpu_has_bf16_dots() -> bool:
    """Whether this CPU has a bfloat16 dot instruction: AMX's tiles, or AVX512-BF16's `vdpbf16ps` (Zen 4), where
    XLA:CPU's bf16 dots run about twice its f32 ones (docs/perf-notes.md, "Twentieth session"); without
    either, bfloat16 weights are widened before each product and were not measured faster."""
    return cpu_has_bf16_tiles() or "avx512_bf16" in _cpu_flags().split()


def library_path() -> Path:
    """Where the library for these sources, jaxlib, compiler flags and CPU lives (built or not)."""
    import jaxlib  # its headers are what the library is compiled against

    key = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        key.update(source.read_bytes())
    for part in (jaxlib.__version__, " ".join(FLAGS), _cpu_flags()):
        key.update(part.encode())
    return cache_dir() / f"xlserve-kernels-{key.hexdigest()[:16]}.so"


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler (c++, g++ or clang++) on PATH")
    return compiler


def build(path: Path) -> None:
    """Compile the kernels into `path` (raises OSError or CalledProcessError when it cannot)."""
    compiler = _compiler()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        objects = [Path(scratch) / f"{source.stem}.o" for source in SOURCES]
        jobs = [subprocess.Popen([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", str(obj)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for source, obj in zip(SOURCES, objects, strict=True)]
        for job in jobs:
            _, stderr = job.communicate()
            if job.returncode:
                for other in jobs:
                    other.kill()
                raise subprocess.CalledProcessError(job.returncode, job.args, stderr=stderr)
        partial = Path(scratch) / path.name
        subprocess.run([compiler, "-shared", *map(str, objects), "-o", str(partial)], check=True,
                       capture_output=True, text=True)
        os.replace(partial, path)


@functools.cache
def native_kernels_ready() -> bool:
    """Whether the native kernels are registered with XLA:CPU, building them first if needed (once a
    process). False, with one warning, where they cannot be built or loaded."""
    import ctypes

    path = library_path()
    try:
        if not path.exists():
            build(path)
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, AttributeError, subprocess.CalledProcessError) as exc:
        detail = exc
        if isinstance(exc, subprocess.CalledProcessError) and exc.stderr:  # the compiler's errors, not its notes
            detail = "\n".join(line for line in exc.stderr.splitlines() if "error" in line)[:2000]
        logger.warning("CPU attention and few-row products run in XLA: the native kernels could not be built or "
                       "loaded (%s)", detail)
        return False
    return True
