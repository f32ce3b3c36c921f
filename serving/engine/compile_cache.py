"""JAX's persistent compilation cache: a restarted server loads its compiled buckets from disk.

Compiling every bucket of an 8B model takes tens of seconds to minutes at each start; with the cache
a restart reads the executables back instead. The setting (`EngineConfig.compilation_cache_dir`):
    "auto"  a per-user directory ($XDG_CACHE_HOME or ~/.cache, then xlserve/jax) on accelerators; off
            on CPU, so tests and CPU runs never write into the home directory unasked.
    "off"   no cache: nothing of the engine's is stored or loaded (a directory JAX was given earlier in
            the process stays JAX's own, for its other programs).
    a path  that directory, on any platform.
JAX reads the directory when it first compiles with a cache, once per process: set it before the
engine compiles anything, and a later engine in the same process keeps the first one's directory.
A directory JAX was already given (`JAX_COMPILATION_CACHE_DIR`, or an earlier engine) wins over "auto".
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xlserve", "jax")


def resolve_cache_dir(setting: str, platform: str) -> str | None:
    """The directory `setting` names on `platform`, or None for no cache."""
    if setting == "off" or (setting == "auto" and platform == "cpu"):
        return None
    return default_cache_dir() if setting == "auto" else os.path.expanduser(setting)


def enable_compilation_cache(setting: str, platform: str) -> str | None:
    """Point JAX's persistent cache at the directory `setting` names; returns the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if setting == "off":
        return None  # nothing of this engine's is stored (a directory JAX was given earlier stays JAX's)
    path = resolve_cache_dir(setting, platform)
    if path is None or (setting == "auto" and current):
        return current
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX's default keeps only executables that took over a second to compile; the sampler's and the
    # small buckets' take less, but together they are seconds of every start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logger.info("compilation cache: %s", path)
    return path
