"""One model over several processes (`serving/engine/multihost.py`): two real `xlserve` processes on
127.0.0.1, each with two CPU devices, one `--tp 4` mesh over both (gloo collectives).

One group starts for the module (start-up compiles every bucket on both ranks, the costly part); the
test that kills its follower runs last. The step-plan format is tested on its own, without processes.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving.engine.multihost import (
    BEAT,
    EXIT_LOST_PEER,
    PlanError,
    StepReplay,
    decode_frame,
    encode_frame,
    encode_step,
)
from serving.engine.scheduler import Chunk
from serving.request import EngineRequest, GenerationConfig
from tests.conftest import add_tokenizer
from tests.http_fixtures import ServerProcess, console_script, free_port, http, openai_client

# Few shapes, and so few pages that four sequences decoding at once must preempt one.
GROUP_ENGINE_FLAGS = ["--session-len", "128", "--cache-block-seq-len", "16", "--num-pages", "13",
                      "--decode-batch-buckets", "4", "--prefill-row-buckets", "1", "--prefill-token-buckets", "16"]
GROUP_ENGINE_OPTIONS = dict(page_size=16, num_pages=13, session_len=128, decode_batch_buckets=(4,),
                            prefill_row_buckets=(1,), prefill_token_buckets=(16,))
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
NUM_PROMPTS, MAX_TOKENS = 16, 32
# Every prompt starts with the same two pages, so later prompts take them from the prefix cache.
SHARED_PREFIX = list(range(100, 132))
PROMPTS = [SHARED_PREFIX + [200 + 7 * i + j for j in range(1 + i % 5)] for i in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def four_head_llama(tmp_path_factory, sentencepiece_dir) -> Path:
    """The tiny Llama with four KV heads, so `--tp 4` splits them."""
    from tests.checkpoints import make_llama_checkpoint
    from tests.sentencepiece_tokenizer import VOCAB_SIZE

    path = make_llama_checkpoint(tmp_path_factory.mktemp("four-heads"), vocab_size=VOCAB_SIZE, num_heads=4,
                                 num_kv_heads=4, max_position_embeddings=256)
    return add_tokenizer(Path(path), sentencepiece_dir)


def _free_port_pair() -> int:
    """A port P with P + 1 free too (the coordinator and the plan channel)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def _rank(checkpoint: Path, rank: int, port: int, coordinator: int, *extra: str) -> ServerProcess:
    return ServerProcess(
        [console_script("xlserve"), "serve", "api_server", str(checkpoint), "--server-name", "127.0.0.1",
         "--server-port", str(port), "--tp", "4", "--nnodes", "2", "--node-rank", str(rank),
         "--dist-init-addr", f"127.0.0.1:{coordinator}", "--model-name", "m", *GROUP_ENGINE_FLAGS, *extra],
        env=TWO_DEVICES)


class Group:
    def __init__(self, checkpoint: Path):
        coordinator = _free_port_pair()
        self.leader_url = f"http://127.0.0.1:{free_port()}"
        self.follower_url = f"http://127.0.0.1:{free_port()}"
        self.leader = _rank(checkpoint, 0, int(self.leader_url.rsplit(":", 1)[1]), coordinator)
        self.follower = _rank(checkpoint, 1, int(self.follower_url.rsplit(":", 1)[1]), coordinator)

    def stop(self) -> None:
        """The leader first: its engine tells the follower to stop, and both leave JAX's job cleanly."""
        for process in (self.leader, self.follower):
            if process.process.poll() is None:
                process.stop()


@pytest.fixture(scope="module")
def group(four_head_llama):
    running = Group(four_head_llama)
    try:
        running.leader.wait_ready(running.leader_url)
        running.follower.wait_until(lambda: http.get(f"{running.follower_url}/health").status_code == 200)
        yield running
    finally:
        running.stop()


def _complete(base_url: str, prompts: list[list[int]]) -> list[str]:
    client = openai_client(f"{base_url}/v1", "none", max_retries=0, timeout=300)

    def one(prompt: list[int]) -> str:
        answer = client.completions.create(model="m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return answer.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def _metric(base_url: str, name: str) -> float:
    lines = http.get(f"{base_url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") or line.startswith(
        name + " "))


# The same prompts through `pipeline()` in one process of four CPU devices at --tp 4.
ONE_PROCESS_SCRIPT = """
import json, sys
from serving import pipeline
from serving.request import GenerationConfig
prompts, options, max_tokens = json.loads(sys.argv[2])
with pipeline(sys.argv[1], tp=4, **options) as pipe:
    print(json.dumps([r.text for r in pipe(prompts, GenerationConfig(max_new_tokens=max_tokens))]))
"""


def test_two_processes_give_the_single_process_tokens(group, four_head_llama):
    from serving import pipeline

    texts = _complete(group.leader_url, PROMPTS)
    with pipeline(str(four_head_llama), **GROUP_ENGINE_OPTIONS) as single:  # --tp 1, here
        expected = [r.text for r in single(PROMPTS, GenerationConfig(max_new_tokens=MAX_TOKENS))]
    four_devices = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS_SCRIPT, str(four_head_llama),
         json.dumps([PROMPTS, GROUP_ENGINE_OPTIONS, MAX_TOKENS])],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=300)
    assert four_devices.returncode == 0, four_devices.stderr
    assert texts == expected
    assert json.loads(four_devices.stdout.strip().splitlines()[-1]) == expected
    assert _metric(group.leader_url, "vllm:num_preemptions_total") > 0
    assert _metric(group.leader_url, "vllm:prefix_cache_hits_total") > 0
    assert _metric(group.leader_url, "xlserve:compilations_after_warmup") == 0
    follower = http.get(f"{group.follower_url}/health")
    assert follower.status_code == 200
    assert follower.json() == {"rank": 1, "following": True, "compilations_after_warmup": 0}


def test_a_follower_serves_only_probes(group):
    assert http.get(f"{group.follower_url}/v1/ready").status_code == 200
    assert http.get(f"{group.follower_url}/v1/models").status_code == 404


def test_a_missing_peer_fails_within_the_init_timeout(four_head_llama):
    coordinator = _free_port_pair()
    lonely = _rank(four_head_llama, 0, free_port(), coordinator, "--dist-init-timeout", "3")
    began = time.monotonic()
    status = lonely.process.wait(timeout=120)
    took = time.monotonic() - began
    lonely.stop()
    assert status != 0
    assert "could not join the group" in lonely.output(), lonely.output()
    assert took < 60


def test_killing_the_follower_makes_the_leader_fail_and_exit(group):
    """Runs last: it ends the module's group. A request generating when the follower dies gets an answer
    (an error), never a hang."""
    client = openai_client(f"{group.leader_url}/v1", "none", max_retries=0, timeout=60)
    stream = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=80, temperature=0, stream=True)
    next(iter(stream))  # generating now
    errors = []

    def read_to_the_end() -> None:
        try:
            for _ in stream:
                pass
        except (openai.APIError, httpx.HTTPError) as error:
            errors.append(error)

    reader = threading.Thread(target=read_to_the_end)
    reader.start()
    group.follower.process.kill()
    began = time.monotonic()
    seen_503 = False
    while group.leader.process.poll() is None and time.monotonic() - began < 30:
        try:
            seen_503 |= http.get(f"{group.leader_url}/health", timeout=2).status_code == 503
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    assert group.leader.process.wait(timeout=1) == EXIT_LOST_PEER
    assert time.monotonic() - began < 15
    assert seen_503
    reader.join(timeout=5)
    assert not reader.is_alive() and errors
    assert "lost follower 1" in group.leader.output()


# ----- the step plan, without processes -----------------------------------------------------------------


def _chunk(request_id: str = "r1", slot: int = 2, admission: int = 1) -> Chunk:
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=5, min_new_tokens=2)
    request = EngineRequest(request_id, [1, 2, 3], config, frozenset({2, 7}), seed=12345)
    return Chunk(request, slot, admission, 0, 3, [1, 2, 3], [4, 5], 0, True, True)


def test_a_step_plan_replays_as_the_same_chunks():
    chunk = _chunk()
    kind, (rows, tokens, packed, decode, plan_chunks) = decode_frame(encode_step(0, [chunk], 4, 16, None, 2), 0)
    assert (kind, rows, tokens, packed, decode) == ("step", 4, 16, None, 2)
    replay = StepReplay()
    (again,) = replay.chunks(plan_chunks)
    for name in ("slot", "admission", "start", "length", "token_ids", "pages", "step", "samples", "first"):
        assert getattr(again, name) == getattr(chunk, name)
    assert again.request.seed == 12345 and again.request.stop_token_ids == frozenset({2, 7})
    assert again.request.config.temperature == 0.7 and again.request.config.min_new_tokens == 2
    # The same occupant of the slot keeps its request object, so the runner's slot row is not rebuilt.
    (next_step,) = replay.chunks(decode_frame(encode_step(1, [chunk], 4, 16, None), 1)[1][4])
    assert next_step.request is again.request
    (other,) = replay.chunks(decode_frame(encode_step(2, [_chunk("r2")], 4, 16, None), 2)[1][4])
    assert other.request is not again.request


def test_a_corrupted_plan_is_caught_by_its_checksum():
    frame = bytearray(encode_step(0, [_chunk()], 4, 16, None))
    frame[-3] ^= 0x01
    with pytest.raises(PlanError, match="checksum"):
        decode_frame(bytes(frame), 0)


def test_a_plan_out_of_order_or_of_another_version_is_refused():
    frame = encode_frame(5, (BEAT, None))
    with pytest.raises(PlanError, match="arrived when 4 was due"):
        decode_frame(frame, 4)
    other_version = frame[:4] + (99).to_bytes(2, "big") + frame[6:]
    with pytest.raises(PlanError, match="version 99"):
        decode_frame(other_version, 5)
    with pytest.raises(PlanError, match="not a step plan"):
        decode_frame(json.dumps({"step": 5}).encode().ljust(30), 5)


# ----- each process reads only its own shards ---------------------------------------------------------------

PLACE_SCRIPT = """
import json, sys
import jax
import numpy as np
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize("127.0.0.1:" + sys.argv[2], 2, int(sys.argv[1]), initialization_timeout=60)
from model.loader import _place
from model.sharding import make_mesh, sharding_for

touched = []

class Recording(np.ndarray):  # stands for the memory-mapped checkpoint tensor: records each slice read
    def __getitem__(self, index):
        touched.append([v for s in index for v in (s.start, s.stop)])
        return np.asarray(super().__getitem__(index))

full = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
placed = _place(full.view(Recording), sharding_for("w", (8, 12), make_mesh(4), (None, "ffn")))
assert all(np.array_equal(np.asarray(s.data), full[s.index]) for s in placed.addressable_shards)
print(json.dumps(sorted(touched)))
"""


def test_each_process_reads_only_its_own_shards():
    """The loader's placement asks the mapped tensor only for the slices of this process's devices."""
    port = _free_port_pair()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ranks = [subprocess.Popen([sys.executable, "-c", PLACE_SCRIPT, str(rank), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], results
    reads = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    # Columns split four ways over two processes of two devices: each process reads its own half.
    assert reads == [[[None, None, 0, 3], [None, None, 3, 6]], [[None, None, 6, 9], [None, None, 9, 12]]], reads


# ----- the plan channel over real sockets, without JAX ------------------------------------------------------


def _channel(timeout: float = 0.5):
    """A leader's broadcaster and one follower's link, connected over 127.0.0.1."""
    from serving.engine.multihost import Group as HostGroup
    from serving.engine.multihost import PlanBroadcaster, connect_to_leader

    group = HostGroup(nnodes=2, node_rank=0, coordinator=f"127.0.0.1:{_free_port_pair()}", timeout=timeout,
                      init_timeout=10)
    leader = PlanBroadcaster(group)
    lost: list[str] = []
    leader.on_lost = lost.append
    follower = {}
    connecting = threading.Thread(target=lambda: follower.update(link=connect_to_leader(
        HostGroup(2, 1, group.coordinator, timeout, 10))))
    connecting.start()
    leader.accept()
    connecting.join()
    return leader, follower["link"], lost


def test_a_silent_follower_is_lost_within_the_timeout():
    leader, _, lost = _channel()  # the follower's end never sends a heartbeat
    began = time.monotonic()
    while not lost and time.monotonic() - began < 5:
        time.sleep(0.05)
    assert lost and "lost follower 1" in lost[0]
    assert time.monotonic() - began < 2
    leader.close()


def test_a_follower_replays_steps_until_the_leader_stops_it():
    from serving.engine.multihost import follow

    leader, link, lost = _channel()
    ran = []
    following = threading.Thread(target=follow, args=(link, lambda *step: ran.append(step), 0.5))
    following.start()
    leader.send_step([_chunk()], 4, 16, None)
    time.sleep(1.2)  # longer than the timeout: heartbeats keep both ends alive meanwhile
    leader.send_step([_chunk(slot=3)], 4, 1, None)
    leader.send_step([_chunk(slot=1)], 6, 16, 18, 2)  # a mixed step: its decoding rows travel too
    leader.close()
    following.join(timeout=5)
    assert not following.is_alive() and not lost
    assert [(chunks[0].slot, *shape) for chunks, *shape in ran] == [(2, 4, 16, None, 0), (3, 4, 1, None, 0),
                                                                     (1, 6, 16, 18, 2)]


def test_a_follower_whose_leader_goes_silent_stops_following():
    from serving.engine.multihost import PeerLost, follow

    leader, link, _ = _channel()
    leader._closing.set()  # its heartbeats stop, its socket stays open: a hung host
    began = time.monotonic()
    with pytest.raises(PeerLost, match="silent"):
        follow(link, lambda *step: None, 0.5)
    assert time.monotonic() - began < 2
    leader.close()
