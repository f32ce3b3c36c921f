"""tools/quant_quality.py, the quality report of issue 21, run on a tiny checkpoint: its rows are what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_quality_tool_reports_an_int8_head_as_a_small_change_beside_fp8_layers(tmp_path):
    """A tiny random Llama: the unquantized row is exact, the int8 LM head (`--lm-head-quant`) changes the logits far
    less than fp8 layers do, and every row carries the greedy agreement the tool counts through the engine."""
    out = tmp_path / "rows.json"
    command = [sys.executable, "-m", "tools.quant_quality", "--tiny", "llama", "--variants", "head-int8", "w-fp8",
               "--text-tokens", "128", "--prompts", "2", "--tokens", "4", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"none", "head-int8", "w-fp8"}
    assert rows["none"]["kl"] == 0 and rows["none"]["agree"] == 1.0
    assert 0 < rows["head-int8"]["kl"] < rows["w-fp8"]["kl"] / 10
    assert rows["head-int8"]["mean_abs_dlogit"] < rows["w-fp8"]["mean_abs_dlogit"] / 5
    assert all(0 <= rows[v]["agree"] <= 1 for v in rows)
