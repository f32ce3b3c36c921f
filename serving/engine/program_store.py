"""Compiled programs on disk under a key known before tracing: a restarted server loads its buckets' programs
without tracing or lowering them.

JAX's persistent compilation cache (`compile_cache`) keys an executable by its lowered program, so even a
start that finds every bucket there first traces and lowers each one in Python, which holds the GIL: the
compile threads take turns, and on a cached start that is most of the time to ready (docs/perf-notes.md).
This store keys a program instead by what is known before tracing it:

- a fingerprint of everything the traced functions close over or depend on: the source of every module of
  the packages that trace (`model`, `xlkernels`, `serving`, `configs`), the versions of JAX and jaxlib,
  the devices (platform, kind, count, platform version), XLA's and JAX's settings that change a program,
  and the owner's own description (the model's config, dtypes, page geometry, attention backend, mesh);
- the program's name and the shapes, dtypes and shardings of its arguments, and its static arguments.

Any difference is a different key, so a stale program is never loaded; the cost of a key that is too
strict is one compile. A program that fails to load, or loads with other input shardings than asked, is
compiled instead. On CPU a program that JAX's own cache answered is not stored: XLA:CPU serializes such an
executable without some of its kernels (jaxlib 0.10.2: the copy, loaded anywhere, fails with "Function ...
not found" when it runs them), which a changed key (any edit of our source) or a second server starting on
the same directory would otherwise store and a later start load.

Loading an executable runs code from the directory: it is trusted as JAX's cache directory is (both live
under the same `--compilation-cache-dir`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
import threading
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable

from xlkernels.native_build import native_kernels_ready

logger = logging.getLogger(__name__)

SUBDIRECTORY = "xlserve-programs"
_PACKAGES = ("model", "xlkernels", "serving", "configs")
# JAX settings that change what a traced function lowers to.
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion",
                 "jax_default_prng_impl", "jax_threefry_partitionable", "jax_use_shardy_partitioner")


@functools.cache
def source_digest() -> str:
    """SHA-256 over the source of every module of the packages whose functions are traced, and of the native
    kernels they call."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in _PACKAGES:
        for path in sorted([*(root / package).rglob("*.py"), *(root / package).rglob("*.cc")]):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def environment_description() -> str:
    """What besides our code decides a compiled program: JAX's version and settings, XLA's flags, the devices."""
    import jaxlib

    devices = jax.devices()
    # Whether the CPU's native kernels are registered decides what a step lowers to (custom calls
    # or XLA's loop and dots), and a stored program calling them needs them registered before it is loaded
    # (this does).
    native = devices[0].platform == "cpu" and native_kernels_ready()
    settings = {name: getattr(jax.config, name, None) for name in _JAX_SETTINGS}
    return repr((jax.__version__, jaxlib.__version__, os.environ.get("XLA_FLAGS", ""),
                 os.environ.get("LIBTPU_INIT_ARGS", ""), sorted(settings.items()), devices[0].platform,
                 devices[0].client.platform_version, [d.device_kind for d in devices], jax.process_count(), native))


# How many of JAX's persistent-cache hits each thread has seen: a compile that raised it was answered by
# JAX's cache (the event is recorded in the compiling thread).
_cache_hits = threading.local()


def _count_cache_hit(event: str, **_: object) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache_hits.count = getattr(_cache_hits, "count", 0) + 1


jax.monitoring.register_event_listener(_count_cache_hit)


def _compile(lowered: jax.stages.Lowered, options: dict[str, Any]) -> tuple[jax.stages.Compiled, bool]:
    """`lowered` compiled with XLA's `options`, and whether JAX's persistent cache answered."""
    before = getattr(_cache_hits, "count", 0)
    compiled = lowered.compile(compiler_options=options or None)
    return compiled, getattr(_cache_hits, "count", 0) > before


def _signature(tree: Any) -> str:
    """The abstract form of a call's arguments: tree structure, then each leaf's shape, dtype and sharding."""
    leaves, structure = jax.tree.flatten(tree)

    def leaf(x: Any) -> tuple:
        return (tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)), repr(getattr(x, "sharding", None)))

    return repr((str(structure), [leaf(x) for x in leaves]))


class ProgramStore:
    """One directory of serialized executables (`jax.experimental.serialize_executable`), by key."""

    def __init__(self, directory: str, description: str):
        self.directory = Path(directory)
        self.fingerprint = hashlib.sha256(
            "\n".join((source_digest(), environment_description(), description)).encode()).hexdigest()
        self.platform = jax.devices()[0].platform
        self.loaded = self.saved = 0  # programs read back / written (tests read them)

    @classmethod
    def beside_cache(cls, cache_dir: str | None, description: str) -> ProgramStore | None:
        """The store inside the compilation cache's directory; None without a cache, or on several hosts
        (their executables span processes, which this store does not serialize)."""
        if cache_dir is None or jax.process_count() > 1:
            return None
        return cls(os.path.join(cache_dir, SUBDIRECTORY), description)

    def path(self, name: str, args: tuple, static: object) -> Path:
        """Where the program `name` called with dynamic `args` (abstract or real) and the static arguments
        `static` (whose repr is part of the key) is stored."""
        key = hashlib.sha256("\n".join((self.fingerprint, name, _signature(args), repr(static)))
                             .encode()).hexdigest()
        return self.directory / f"{name}-{key[:40]}.bin"

    def load(self, path: Path, args: tuple) -> jax.stages.Compiled | None:
        """The program stored at `path` (`ProgramStore.path`), placed as `args` are, or None."""
        if not path.exists():
            return None
        try:
            blob, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = serialize_executable.deserialize_and_load(blob, in_tree, out_tree,
                                                                 execution_devices=_devices(args))
        except Exception as exc:  # a truncated or foreign file: compile instead, and overwrite it
            logger.warning("could not load the stored program %s (%s: %s); compiling it", path.name,
                           type(exc).__name__, exc)
            return None
        if not _same_input_shardings(compiled, args):
            logger.warning("the stored program %s expects other input shardings; compiling it", path.name)
            return None
        self.loaded += 1
        return compiled

    def save(self, path: Path, compiled: jax.stages.Compiled, from_jax_cache: bool = False) -> None:
        """Write `compiled` at `path` (atomically: a reader sees the whole file or none), unless it is an
        XLA:CPU executable that JAX's cache answered (see the module docstring)."""
        if from_jax_cache and self.platform == "cpu":
            logger.debug("not storing %s: XLA:CPU re-serializes a cached executable incompletely", path.name)
            return
        try:
            payload = pickle.dumps(serialize_executable.serialize(compiled))
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(handle, "wb") as f:
                f.write(payload)
            os.replace(temporary, path)
            self.saved += 1
        except Exception as exc:  # a full disk or an executable that cannot be serialized: only slower starts
            logger.warning("could not store the compiled program %s (%s: %s)", path.name, type(exc).__name__, exc)


def _devices(args: tuple) -> list[jax.Device] | None:
    """The devices the arguments are placed on (a mesh may use fewer than the host has)."""
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return sorted(sharding.device_set, key=lambda d: d.id)
    return None


def _same_input_shardings(compiled: jax.stages.Compiled, args: tuple) -> bool:
    wanted = jax.tree.leaves(args)
    got = jax.tree.leaves(compiled.input_shardings[0])
    if len(wanted) != len(got):
        return False
    ndims = [np.ndim(x) for x in wanted]
    return all(getattr(w, "sharding", None) is None or w.sharding.is_equivalent_to(g, n)
               for w, g, n in zip(wanted, got, ndims, strict=True))


class Programs:
    """One jitted function's compiled programs, by a key its caller computes cheaply on the hot path (a
    bucket's shape, a sampler branch): compiled at start-up, or loaded from a store, and called directly.
    A call whose key was never compiled goes through the jitted function (and compiles)."""

    def __init__(self, function: Any, name: str, store: ProgramStore | None, static_args: int = 0):
        """static_args: how many trailing positional arguments are static (the jitted function's
        `static_argnums`; a jit with `in_shardings` takes no keyword arguments)."""
        self.function, self.name, self.store = function, name, store
        self._static_args = static_args
        self._compiled: dict[Hashable, jax.stages.Compiled] = {}

    def compile(self, key: Hashable, *args: Any, compiler_options: dict[str, Any] | None = None,
                **static: Any) -> None:
        """Make the program for `key` from abstract `args` (`jax.ShapeDtypeStruct`s, or arrays whose shapes
        are all that is read) and `static` keyword arguments, with XLA's `compiler_options`; thread-safe for
        distinct keys."""
        dynamic = args[: len(args) - self._static_args]
        options = dict(sorted((compiler_options or {}).items()))
        path = None if self.store is None else self.store.path(self.name, dynamic,
                                                               (args[len(dynamic):], static, options))
        compiled = None if path is None else self.store.load(path, dynamic)
        if compiled is None:
            compiled, from_jax_cache = _compile(self.function.lower(*args, **static), options)
            if path is not None:
                self.store.save(path, compiled, from_jax_cache)
        self._compiled[key] = compiled

    def compiled(self, key: Hashable) -> jax.stages.Compiled | None:
        """The program compiled (or loaded) for `key`, if any."""
        return self._compiled.get(key)

    def __call__(self, key: Hashable, *args: Any, **static: Any) -> Any:
        compiled = self._compiled.get(key)
        if compiled is None:
            return self.function(*args, **static)
        return compiled(*args[: len(args) - self._static_args] if self._static_args else args)
