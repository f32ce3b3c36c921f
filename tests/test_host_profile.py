"""tools/host_profile.py keeps the engine loop's samples of a py-spy raw profile and ranks its frames."""

from tools.host_profile import loop_samples, summarize

RAW = [
    "main (x.py:1);Engine._loop (engine.py:499);Engine._read_back (engine.py:630) 30",
    "main (x.py:1);Engine._loop (engine.py:494);Engine._run (engine.py:624);Compiled.__call__ (stages.py:890) 10",
    "Thread.run (threading.py:982);import (x.py:2) 99",  # another thread: left out
    "garbled line without a count",
]


def test_only_the_loops_stacks_count_and_frames_rank_by_samples():
    stacks = loop_samples(RAW)
    assert [count for _, count in stacks] == [30, 10]
    assert all(frames[0].startswith("Engine._loop") for frames, _ in stacks)
    text = summarize(stacks, top=5)
    assert text.splitlines()[0] == "engine loop: 40 samples"
    cumulative = text.split("self:")[0]
    assert cumulative.index("Engine._read_back") < cumulative.index("Engine._run")  # 30 before 10
    assert " 75.0%  Engine._read_back (engine.py:630)" in text and " 25.0%  Compiled.__call__" in text
    assert "import" not in text
