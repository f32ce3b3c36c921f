"""The engine in a child process (`EngineProcess`): the same tokens as the engine on a thread, outputs
delivered step by step through the step listeners, aborts, stats and profiling across the pipe, load
failures raised in the server process, a stopped child that blocks none of the server's calls, and a
child that dies failing its requests instead of leaving them waiting."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving import GenerationConfig
from serving.engine import process
from serving.engine.config import EngineConfig
from serving.engine.process import EngineProcess
from serving.request import EngineOutput, FinishReason, InvalidRequestError
from tests.conftest import TINY_ENGINE_OPTIONS
from tests.sentencepiece_tokenizer import VOCAB_SIZE


@pytest.fixture(scope="module")
def engine_process(tiny_llama: Path):
    engine = EngineProcess.from_pretrained(str(tiny_llama), EngineConfig.from_options(**TINY_ENGINE_OPTIONS))
    engine.start()
    yield engine
    engine.shutdown()


def submit(engine, prompt: list[int], config: GenerationConfig, name: str
           ) -> tuple[list[EngineOutput], threading.Event]:
    outputs: list[EngineOutput] = []
    done = threading.Event()

    def sink(output: EngineOutput) -> None:
        outputs.append(output)
        if output.finished:
            done.set()

    engine.submit(engine.make_request(prompt, config, name), sink)
    return outputs, done


def tokens(outputs: list[EngineOutput]) -> list[int]:
    return [t for output in outputs for t in output.new_token_ids]


def test_the_same_tokens_as_the_engine_on_a_thread(engine_process, tiny_pipe):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in (5, 17, 70)]
    configs = [GenerationConfig(max_new_tokens=12, ignore_eos=True),
               GenerationConfig(max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=0.8, random_seed=3),
               GenerationConfig(max_new_tokens=12, ignore_eos=True)]
    steps = []
    engine_process.step_listeners.append(lambda: steps.append(1))
    runs = [submit(engine_process, p, c, f"same-{i}") for i, (p, c) in enumerate(zip(prompts, configs, strict=True))]
    for _, done in runs:
        assert done.wait(60)
    engine_process.step_listeners.clear()
    expected = [r.token_ids for r in tiny_pipe(prompts, configs)]
    assert [tokens(outputs) for outputs, _ in runs] == expected
    assert all(outputs[-1].finish_reason is FinishReason.LENGTH for outputs, _ in runs)
    assert len(steps) >= 12, "outputs arrive step by step, each step followed by the listeners"
    stats = engine_process.stats()
    assert stats.compilations_after_warmup == 0 and stats.num_pages_used == 0


def test_an_embedding_crosses_the_pipe(engine_process, hf_tiny):
    """An embedding request (`EngineRequest.embed`) runs its prompt only and ends with the final norm's output
    at its last token: transformers' last hidden state there."""
    import torch

    prompt = [5, 9, 13, 17, 21]
    request = engine_process.make_request(prompt, GenerationConfig(max_new_tokens=0), "embed")
    request.embed = True
    outputs, done = [], threading.Event()
    engine_process.submit(request, lambda output: (outputs.append(output), output.finished and done.set()))
    assert done.wait(60)
    assert [o.new_token_ids for o in outputs] == [[]] and outputs[-1].num_prompt_tokens == len(prompt)
    with torch.no_grad():
        want = hf_tiny(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    np.testing.assert_allclose(outputs[-1].embedding, want, rtol=1e-4, atol=1e-5)
    assert engine_process.stats().num_pages_used == 0


def test_requests_are_validated_in_the_server_process(engine_process):
    with pytest.raises(InvalidRequestError, match="session length"):
        engine_process.make_request([5] * engine_process.max_session_len, GenerationConfig(), "too-long")
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        engine_process.make_request([VOCAB_SIZE], GenerationConfig(), "bad-id")


def test_abort_ends_a_request_and_frees_its_pages(engine_process):
    outputs, done = submit(engine_process, [5, 6, 7], GenerationConfig(max_new_tokens=100, ignore_eos=True), "abort")
    while not outputs:
        threading.Event().wait(0.01)
    engine_process.abort("abort")
    assert done.wait(30)
    assert outputs[-1].finish_reason is FinishReason.ABORT and len(tokens(outputs)) < 100
    assert engine_process.stats().num_pages_used == 0


def test_profiling_runs_in_the_engine_process(engine_process, tmp_path):
    engine_process.start_profile(str(tmp_path))
    try:
        _, done = submit(engine_process, [5, 6, 7], GenerationConfig(max_new_tokens=3), "profiled")
        assert done.wait(30)
    finally:
        engine_process.stop_profile()
    assert list(tmp_path.rglob("*.xplane.pb")), "the child wrote the trace"
    with pytest.raises(RuntimeError):  # JAX's own refusal, raised across the pipe
        engine_process.stop_profile()


def test_nothing_waits_for_a_stopped_child(engine_process):
    """SIGSTOP stands in for a wedged device: stats come from the child's last report, and submits and
    aborts return at once even when they outgrow the pipe's buffer; the heartbeat stands still until the
    child runs again, which then serves what was sent meanwhile."""
    rng = np.random.default_rng(1)
    os.kill(engine_process._process.pid, signal.SIGSTOP)
    try:
        heartbeat = engine_process.heartbeat
        began = time.monotonic()
        assert engine_process.stats().num_running == 0
        runs = []
        for i in range(300):  # ~1 KB pickled each: several times what the pipe holds
            prompt = rng.integers(3, VOCAB_SIZE, size=100).tolist()
            runs.append(submit(engine_process, prompt, GenerationConfig(max_new_tokens=1), f"stopped-{i}"))
            engine_process.abort(f"stopped-{i}")
        assert time.monotonic() - began < 2.0
        time.sleep(process.HEARTBEAT_S + 0.5)
        assert engine_process.heartbeat == heartbeat
    finally:
        os.kill(engine_process._process.pid, signal.SIGCONT)
    for outputs, done in runs:
        assert done.wait(60)
        assert outputs[-1].finish_reason in (FinishReason.ABORT, FinishReason.LENGTH)
    assert engine_process.heartbeat > heartbeat
    deadline = time.monotonic() + 10
    while engine_process.stats().num_pages_used:  # the report after the last step
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_late_answer_is_not_taken_for_the_next_question(engine_process, tmp_path, monkeypatch):
    """A question that timed out (the child was stopped) gets its answer late: the next question must get
    its own answer, not that one (once, every later question got the previous one's)."""
    monkeypatch.setattr(process, "REPLY_TIMEOUT_S", 0.5)
    os.kill(engine_process._process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RuntimeError, match="did not answer 'stop_profile'"):
            engine_process.stop_profile()  # no trace runs: the late answer will be JAX's refusal
    finally:
        os.kill(engine_process._process.pid, signal.SIGCONT)
    monkeypatch.setattr(process, "REPLY_TIMEOUT_S", 30.0)
    engine_process.start_profile(str(tmp_path))  # its own answer: started, not the refusal
    engine_process.stop_profile()
    assert list(tmp_path.rglob("*.xplane.pb"))


def test_a_dead_engine_process_fails_its_requests(engine_process):
    """Last in this module: it kills the fixture's child."""
    outputs, done = submit(engine_process, [5, 6, 7], GenerationConfig(max_new_tokens=10**4, ignore_eos=True), "dies")
    while not outputs:
        threading.Event().wait(0.01)
    os.kill(engine_process._process.pid, signal.SIGKILL)
    assert done.wait(30)
    assert outputs[-1].finish_reason is FinishReason.ERROR and "engine" in outputs[-1].error
    engine_process._reader.join(10)
    assert not engine_process.alive and not engine_process.ready
    with pytest.raises(RuntimeError, match="not running"):
        submit(engine_process, [5], GenerationConfig(max_new_tokens=1), "after")
    engine_process.abort("dies")  # nothing to abort, nothing raised (once: BrokenPipeError)
    engine_process.end_session("a-session")
    assert engine_process.stats().num_pages_total > 0  # the last report
    began = time.monotonic()
    engine_process.shutdown()
    assert time.monotonic() - began < 1.0


def test_a_load_failure_is_raised_in_the_server_process(tiny_llama: Path, tmp_path: Path):
    for file in tiny_llama.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, tmp_path / file.name)
    with pytest.raises(FileNotFoundError):  # the child's error, not a hang or a generic one
        EngineProcess.from_pretrained(str(tmp_path), EngineConfig.from_options(**TINY_ENGINE_OPTIONS))


def test_the_flag_and_its_variable():
    from serving.cli import build_parser
    from serving.http.options import from_arguments, from_environment

    parser = build_parser()
    assert from_arguments(parser.parse_args(["serve", "api_server"]), environ={}).settings.engine_process
    launch = from_arguments(parser.parse_args(["serve", "api_server", "--no-engine-process"]), environ={})
    assert launch.settings.engine_process is False
    assert from_environment({"XLSERVE_ENGINE_PROCESS": "0"}).settings.engine_process is False
