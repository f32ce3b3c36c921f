"""Start-up progress on a terminal: `xlserve serve api_server` in a pseudo-terminal draws tqdm bars for
the weights and the buckets (the bucket bar reaches the bucket count), then prints its summary line.
The plain lines written when no terminal is attached are checked in test_http_processes.py, on the
server that test starts anyway."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from tests.http_fixtures import SMALL_BUCKET_FLAGS, STARTUP_TIMEOUT_S, all_compiled, console_script, free_port


def read_until(fd: int, output: bytearray, done: callable, timeout: float) -> None:
    """Read the terminal into `output` until `done(output)`, the child closes it, or the time is up."""
    deadline = time.monotonic() + timeout
    while not done(output) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                return
            if not chunk:
                return
            output += chunk


def test_start_up_bars_on_a_terminal(tiny_llama: Path) -> None:
    port = free_port()
    command = [console_script("xlserve"), "serve", "api_server", str(tiny_llama), "--server-name", "127.0.0.1",
               "--server-port", str(port), *SMALL_BUCKET_FLAGS]
    terminal, child_end = pty.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns: a window
    process = subprocess.Popen(command, stdin=child_end, stdout=child_end, stderr=child_end, close_fds=True)
    os.close(child_end)
    output = bytearray()
    try:
        read_until(terminal, output, all_compiled, STARTUP_TIMEOUT_S)
    finally:
        process.send_signal(signal.SIGTERM)
        read_until(terminal, output, lambda out: False, 60)
        status = process.wait(60)
        os.close(terminal)
    text = output.decode(errors="replace")
    assert status == 0, text
    weights = re.findall(r"weights: 100%\|.*?\| [\d.]+\w?/[\d.]+\w? \[.*?, (\d+)/(\d+) tensors\]", text)
    assert weights and weights[-1][0] == weights[-1][1], text
    buckets = re.findall(r"buckets: +\d+%\|.*?\| (\d+)/(\d+) \[", text)
    done, total = buckets[-1]
    assert done == total and int(total) >= 4, text  # the bar reached the bucket count
    # Ready once it can serve: the rest of the buckets may still be compiling then, and get a line at the end.
    assert re.search(rf"ready after [\d.]+s: float32, TP 1, .* (\d+ of )?{total} buckets compiled", text), text
    assert "compiled bucket" not in text  # bars, not the lines written when no terminal is attached
