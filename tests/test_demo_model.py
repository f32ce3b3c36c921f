"""The built-in demo checkpoint: deterministic, atomic, reusable, and a valid HF Llama checkpoint."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from configs.demo import DEMO_MODEL_NAME, DEMO_VERSION, REQUIRED_FILES, ensure_demo_checkpoint
from serving.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return Path(ensure_demo_checkpoint(str(tmp_path_factory.mktemp("cache"))))


def test_location_and_labels(demo):
    assert demo.name == f"demo-v{DEMO_VERSION}"
    assert sorted(p.name for p in demo.iterdir()) == sorted(REQUIRED_FILES)
    assert json.loads((demo / "config.json").read_text())["xlserve_demo"] is True
    readme = (demo / "README.txt").read_text()
    assert DEMO_MODEL_NAME in readme and "RANDOM weights" in readme and "gibberish" in readme


def test_generation_is_byte_for_byte_deterministic(demo, tmp_path):
    again = Path(ensure_demo_checkpoint(str(tmp_path)))
    for name in REQUIRED_FILES:
        assert (again / name).read_bytes() == (demo / name).read_bytes(), name


def test_reused_when_present_and_rebuilt_when_damaged(tmp_path):
    first = Path(ensure_demo_checkpoint(str(tmp_path)))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint(str(tmp_path)) == str(first)
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    (first / "tokenizer.json").unlink()
    assert ensure_demo_checkpoint(str(tmp_path)) == str(first)
    assert (first / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no staging or damaged leftovers


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSERVE_CACHE_DIR", str(tmp_path))
    assert ensure_demo_checkpoint() == str(tmp_path / f"demo-v{DEMO_VERSION}")


def test_concurrent_first_use_sees_one_complete_checkpoint(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: ensure_demo_checkpoint(str(tmp_path)), range(4)))
    assert len(paths) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"demo-v{DEMO_VERSION}"]
    assert sorted(p.name for p in Path(paths.pop()).iterdir()) == sorted(REQUIRED_FILES)


def test_loads_with_transformers(demo):
    config = AutoConfig.from_pretrained(str(demo), local_files_only=True)
    hf_tok = AutoTokenizer.from_pretrained(str(demo), local_files_only=True)
    assert config.model_type == "llama"
    assert config.vocab_size == len(hf_tok)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 2)
    assert set(config.eos_token_id) == set(hf_tok.convert_tokens_to_ids(["<|im_end|>", "</s>"]))
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_weights_match_the_hf_llama_layout(demo):
    import torch
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(demo), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()


def test_tokenizer_round_trips_arbitrary_unicode(demo):
    tok = Tokenizer.from_pretrained(str(demo))
    assert tok.eos_token_ids == {tok.encode("<|im_end|>", add_special_tokens=False)[0]}
    specials = tok.encode("<s></s><|im_start|><|im_end|>", add_special_tokens=False)
    assert tok.all_special_ids == frozenset(specials) and len(specials) == 4
    rng = random.Random(0)
    # Every code point except surrogates (not encodable): controls, combining marks, CJK, astral planes.
    for _ in range(200):
        text = "".join(chr(rng.choice([rng.randrange(0, 0xD800), rng.randrange(0xE000, 0x110000)]))
                       for _ in range(rng.randrange(1, 40)))
        assert tok.decode(tok.encode(text)) == text
    sample = "The model says: 你好, 🦜 e\u0301 \x00\t\n  end"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode("hello world the model")) == 4  # merges make common words one token
