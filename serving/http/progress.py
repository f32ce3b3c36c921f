"""What `xlserve serve api_server` shows while it starts: bars on a terminal, plain lines otherwise, then one
summary line when the server is ready.

The engine reports each tensor loaded and each bucket compiled (serving.engine.progress); here those
reports become, on a terminal, a tqdm bar of the weights read (bytes, with the tensor count) and a bar of
the buckets compiled (n of m, with the last one's shape and seconds). Not on a terminal (a log file, a
container's output), bars would be a smear of carriage returns, so the same facts come as lines: one per
tenth of the weights, one per bucket.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

from serving.engine.progress import StartupEvent

if TYPE_CHECKING:
    from serving.http.state import ServerState

PREFIX = "xlserve:"


class StartupDisplay:
    """A start-up listener that shows progress on `stream` (a terminal or not) and writes the summary."""

    def __init__(self, stream: TextIO = sys.stderr, terminal: bool | None = None):
        self.stream = stream
        self.terminal = stream.isatty() if terminal is None else terminal
        self.began = time.monotonic()
        self.buckets = 0  # buckets compiled so far
        self.total = 0  # buckets to compile
        self._announced = False  # the ready line is out: the last bucket then gets a line of its own
        self._bars: dict[str, tqdm] = {}
        self._weights_tenths = 0  # tenths of the weights already written as lines
        self._lock = threading.Lock()  # weights come on the main thread, buckets on another

    def __call__(self, event: StartupEvent) -> None:
        with self._lock:
            if event.stage == "weights":
                self._weights(event)
            else:
                self._bucket(event)

    def _bar(self, stage: str, total: int, **options: object) -> tqdm:
        if stage not in self._bars:
            self._bars[stage] = tqdm(total=total, desc=stage, file=self.stream, **options)
        return self._bars[stage]

    def _weights(self, event: StartupEvent) -> None:
        if self.terminal:
            bar = self._bar("weights", event.bytes_total, unit="B", unit_scale=True, unit_divisor=1024)
            bar.set_postfix_str(f"{event.done}/{event.total} tensors", refresh=False)
            bar.update(event.bytes_done - bar.n)
            if event.done == event.total:
                bar.close()
            return
        tenths = 10 * event.bytes_done // max(event.bytes_total, 1)
        if tenths > self._weights_tenths or event.done == event.total:
            self._weights_tenths = tenths
            self._line(f"loaded {event.done}/{event.total} tensors, {_gib(event.bytes_done)} of "
                       f"{_gib(event.bytes_total)}")

    def _bucket(self, event: StartupEvent) -> None:
        self.buckets, self.total = event.done, event.total
        if self.terminal:
            bar = self._bar("buckets", event.total, unit="bucket")
            bar.set_postfix_str(f"{event.label} {event.seconds:.1f}s", refresh=False)
            bar.update(event.done - bar.n)
            if event.done == event.total:
                bar.close()
        else:
            self._line(f"compiled bucket {event.done}/{event.total} {event.label} in {event.seconds:.1f}s")
        if event.done == event.total and self._announced:  # the server became ready before the last bucket
            self._line(f"all {event.total} buckets compiled after {time.monotonic() - self.began:.1f}s")

    def _line(self, text: str) -> None:
        print(PREFIX, text, file=self.stream, flush=True)

    def summary(self, state: ServerState, url: str) -> str:
        """The ready line: model, dtype, TP, KV cache, buckets, time to ready, and where to go."""
        engine, settings = state.engine, state.settings
        pages = engine.stats().num_pages_total
        quantized = f" ({engine.quantization_name})" if engine.quantization_name else ""
        where = [f"OpenAI API at {url}/v1"]
        if settings.webui:
            where.append(f"chat at {url}/chat")
        where.append(f"Swagger UI at {url}/{'docs' if settings.webui and settings.chat_at_root else ''}")
        with self._lock:
            self._announced = True
            # The engine's wall time (its threads compile side by side: the units' own times overlap).
            compiled = (f"{self.buckets} buckets compiled in {engine.compile_seconds:.1f}s"
                        if self.buckets == self.total else
                        f"{self.buckets} of {self.total} buckets compiled (the rest compile while it serves)")
        return (
            f"{PREFIX} {settings.model_name} ready after {time.monotonic() - self.began:.1f}s: "
            f"{engine.dtype_name}{quantized}, TP {engine.engine_config.tp}, "
            f"{pages} KV pages of {engine.page_size} tokens "
            f"({pages * engine.page_size} tokens), {compiled}; " + ", ".join(where)
        )


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"
