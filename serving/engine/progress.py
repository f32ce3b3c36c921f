"""Start-up progress: what the engine reports while it loads its weights and compiles its buckets.

The engine only reports (one `StartupEvent` per tensor loaded and per program compiled, to a listener it
is given); how progress is shown (bars on a terminal, log lines otherwise) is the caller's business, so
the engine stays free of any display code. Events are small frozen dataclasses, so an engine in a child
process can send them up its pipe as they happen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StartupEvent:
    """One step of start-up: `done` of `total` tensors loaded (stage "weights") or programs compiled
    (stage "buckets")."""

    stage: Literal["weights", "buckets"]
    done: int
    total: int
    bytes_done: int = 0  # weights: bytes of the tensors loaded so far
    bytes_total: int = 0  # weights: bytes of all the checkpoint's tensors the model reads
    label: str = ""  # buckets: the program's shape, e.g. "[4 x 16]"
    seconds: float = 0.0  # buckets: how long this program took to compile


StartupListener = Callable[[StartupEvent], None]


def weights_reporter(listener: StartupListener | None) -> Callable[[int, int, int, int], None] | None:
    """The loader's per-tensor callback (tensors done, of total, bytes done, of total) as events."""
    if listener is None:
        return None
    return lambda done, total, bytes_done, bytes_total: listener(
        StartupEvent("weights", done, total, bytes_done=bytes_done, bytes_total=bytes_total)
    )


def buckets_reporter(listener: StartupListener | None) -> Callable[[int, int, str, float], None] | None:
    """The runner's per-program callback (programs done, of total, shape, seconds) as events."""
    if listener is None:
        return None
    return lambda done, total, label, seconds: listener(StartupEvent("buckets", done, total, label=label,
                                                                     seconds=seconds))
