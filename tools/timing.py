"""Device timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def timed(fn: Callable[[], object], repeats: int = 30) -> float:
    """Milliseconds per call over `repeats` back-to-back dispatches, blocked once (after a warm-up call).

    Host dispatch is hidden whenever it is shorter than the device work, as in a serving loop.
    """
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1e3


def copy_bandwidth() -> float:
    """Bytes per second of a chain of 1 GiB device-to-device copies (read + write): the roofline's bandwidth."""
    state = {"x": jnp.ones((1 << 29,), jnp.bfloat16)}
    scale = jax.jit(lambda a: a * 1.0001)

    def run() -> jax.Array:
        state["x"] = scale(state["x"])
        return state["x"]

    return 2 * state["x"].nbytes / (timed(run, 50) / 1e3)
