"""Where the engine loop's host time goes, from a py-spy raw profile (`py-spy record -f raw`).

    py-spy record -r 250 -f raw -o host.txt -- python -m tools.bench_engine ... throughput ...
    python -m tools.host_profile host.txt

Keeps the samples of the engine's loop thread (stacks through `Engine._loop`) and prints, per frame, the
share of those samples spent in it or below it (cumulative) and the frames where samples end (self time).
The read-back's wait for the device shows as self time in `Engine._read_back`: the rest is host work.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

LOOP_FRAME = "Engine._loop"


def loop_samples(lines: list[str]) -> list[tuple[list[str], int]]:
    """(frames from the engine loop inward, sample count) for every raw stack through `Engine._loop`."""
    stacks = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        start = next((i for i, frame in enumerate(frames) if LOOP_FRAME in frame), None)
        if start is not None and count.isdigit():
            stacks.append((frames[start:], int(count)))
    return stacks


def summarize(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(count for _, count in stacks)
    cumulative: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
        for frame in set(frames[1:]):
            cumulative[frame] += count
    lines = [f"engine loop: {total} samples"]
    lines += ["cumulative:"] + [f"{n:7d} {100 * n / total:5.1f}%  {f}" for f, n in cumulative.most_common(top)]
    lines += ["self:"] + [f"{n:7d} {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path, help="py-spy's raw output")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    stacks = loop_samples(args.profile.read_text().splitlines())
    if not stacks:
        raise SystemExit(f"{args.profile}: no samples through {LOOP_FRAME}")
    print(summarize(stacks, args.top))


if __name__ == "__main__":
    main()
