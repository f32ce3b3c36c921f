"""Start-up compilation: every bucket's programs, compiled on a pool of threads, those serving needs first.

XLA's compiler releases the GIL, so programs compile side by side on as many threads as the process has
cores (tracing and lowering, which are Python, still take turns). A program is compiled without being
run (`program_store.Programs` keeps `jit(f).lower(...).compile()`'s executable, or one loaded from disk, under
its bucket's key, so the first step of that shape calls it without compiling), which is what lets the rest
compile while the engine already serves: compiling needs only the shapes of the device state, never the
state itself.

The work comes as units (`CompileUnit`), one per bucket: the programs a step of that shape needs before it
may run. The first `essential` units (the smallest decode bucket and a prefill bucket: enough to make
progress on any request) are submitted first, their steps (the longest programs) ahead of their samplers,
and the others wait until they are compiled, so they finish first; `BucketCompiler.wait(essential_only=
True)` returns once they have, and the others go on in the background, each announced to `on_done` as
it completes, so the scheduler can start choosing it (`config.BucketSet.compiled`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from serving.engine.config import StepShape

logger = logging.getLogger(__name__)

_local = threading.local()


def on_startup_thread() -> bool:
    """Whether the calling thread is one of start-up's compile threads (`CompilationCounter` leaves them out)."""
    return getattr(_local, "compiling", False)


def default_threads() -> int:
    """One compile thread per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CompileUnit:
    """The programs one bucket needs before a step may run it (`shape`); None: programs the steps use once
    they are compiled and do without until then (cheaper sampler branches)."""

    shape: StepShape | None
    label: str
    programs: tuple[Callable[[], None], ...]


class BucketCompiler:
    """Compiles `units` on `threads` threads, in order; `on_done(unit, done, total, seconds)` hears of each
    unit once all its programs are compiled (on a compile thread), `seconds` being their compile time."""

    def __init__(self, units: list[CompileUnit], essential: int, threads: int | None = None,
                 on_done: Callable[[CompileUnit, int, int, float], None] | None = None):
        self.units = units
        self.essential = essential
        self.on_done = on_done
        self.threads = max(1, threads or default_threads())
        self.began = 0.0
        self.finished_at: float | None = None  # time.perf_counter() when the last unit was done
        self.done = 0
        self.failed: BaseException | None = None
        self._lock = threading.Lock()
        self._futures: list[list[Future]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._essential_left = 0  # essential programs not compiled yet
        self._essential_done = threading.Event()  # the others start once it is set
        self._cancelled = False

    @property
    def remaining(self) -> int:
        return len(self.units) - self.done

    @property
    def seconds(self) -> float:
        """Wall seconds from the start to the last unit (so far)."""
        return (self.finished_at or time.perf_counter()) - self.began

    def start(self) -> None:
        """Queue every program: the essential units' first programs (their steps, the longest) first, then the
        rest of the essential units', then the others, which wait until the essential ones are compiled so
        they take no core from them (XLA:CPU's compiler runs several threads of its own)."""
        self.began = time.perf_counter()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="xlserve-compile")
        accounts = [([len(unit.programs)], [0.0]) for unit in self.units]
        essential = [(u, 0) for u in range(self.essential) if self.units[u].programs]
        essential += [(u, p) for u in range(self.essential) for p in range(1, len(self.units[u].programs))]
        others = [(u, p) for u in range(self.essential, len(self.units)) for p in range(len(self.units[u].programs))]
        self._essential_left = len(essential)
        if not essential:
            self._essential_done.set()
        futures: dict[tuple[int, int], Future] = {}
        for u, p in essential + others:
            futures[u, p] = self._pool.submit(self._compile, self.units[u], self.units[u].programs[p], *accounts[u],
                                              u < self.essential)
        self._futures = [[futures[u, p] for p in range(len(unit.programs))] for u, unit in enumerate(self.units)]
        self._pool.shutdown(wait=False)  # its threads end once the queue is done

    def cancel(self) -> None:
        """Drop the programs not started yet (an engine shutting down while its buckets compile)."""
        self._cancelled = True
        for futures in self._futures:
            for future in futures:
                future.cancel()
        self._essential_done.set()  # a program waiting for dropped essential ones ends instead of waiting forever

    def wait(self, essential_only: bool = False) -> None:
        """Block until the essential units (or all) are compiled; raises the first failure among them."""
        for futures in self._futures[: self.essential] if essential_only else self._futures:
            for future in futures:
                future.result()

    def _compile(self, unit: CompileUnit, program: Callable[[], None], left: list[int], spent: list[float],
                 essential: bool) -> None:
        _local.compiling = True
        if not essential:
            self._essential_done.wait()
            if self._cancelled:
                return
        began = time.perf_counter()
        try:
            program()
        except BaseException as error:
            logger.exception("compiling %s failed", unit.label)
            self.failed = self.failed or error
            raise
        finally:
            if essential:  # a failed one counts too: its error is what `wait` raises, and the rest go on
                with self._lock:
                    self._essential_left -= 1
                    if not self._essential_left:
                        self._essential_done.set()
        with self._lock:  # held while `on_done` runs too, so units are announced one at a time, in order
            spent[0] += time.perf_counter() - began
            left[0] -= 1
            if left[0]:
                return
            self.done += 1
            if self.done == len(self.units):
                self.finished_at = time.perf_counter()
            if self.on_done is not None:
                self.on_done(unit, self.done, len(self.units), spent[0])
