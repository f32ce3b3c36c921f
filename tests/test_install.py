"""The installed distribution lives beside others: its top-level import names are its own, and its
kernels import in one process with Hugging Face's `kernels`, which transformers requires."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Top-level names that other projects install (Hugging Face's kernel hub, a popular `tools`, ...).
TAKEN_NAMES = {"kernels", "tools", "tests", "utils", "common", "src"}


def own_top_level_names() -> set[str]:
    names = importlib.metadata.distribution("xlserve").read_text("top_level.txt")
    assert names, "the xlserve distribution lists no top-level names: is it installed?"
    return set(names.split())


def test_top_level_names_are_ours_alone():
    names = own_top_level_names()
    assert names == {"configs", "model", "serving", "xlkernels"}
    assert not names & TAKEN_NAMES
    providers = importlib.metadata.packages_distributions()
    shared = {name: sorted(set(providers.get(name, [])) - {"xlserve"}) for name in names}
    assert not any(shared.values()), f"installed by other distributions too: {shared}"


def test_hub_kernels_and_ours_import_in_one_process():
    """With the checkout on sys.path (as under pytest) and from elsewhere (as the console script)."""
    script = (
        "import transformers.integrations.hub_kernels, transformers.activations, kernels, xlkernels\n"
        "from xlkernels import get_paged_attention\n"
        "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
        "print(xlkernels.__file__)\n"
    )
    # Both at once: each spends seconds importing transformers and torch.
    processes = [subprocess.Popen([sys.executable, "-c", script], cwd=cwd, env={"PYTHONPATH": path, "PATH": "/usr/bin"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cwd, path in ((REPO, str(REPO)), (Path("/"), ""))]
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr
            assert Path(stdout.strip()).parent.name == "xlkernels"
    finally:
        for process in processes:
            process.kill()
            process.wait()
