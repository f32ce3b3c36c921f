"""`xlserve serve api_server --dp 2 --tp 2` on four fake CPU devices: two replicas of two devices each, in
child processes, behind one proxy on the server port; and the clear refusal of more devices than exist.
The tiny Llama serves (the demo model's vocabulary does not split over two devices)."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.cli import main
from tests.http_fixtures import (
    SMALL_BUCKET_FLAGS,
    STARTUP_TIMEOUT_S,
    ServerProcess,
    console_script,
    free_port,
    http,
    openai_client,
)

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
KEY = "dp-key"


def test_dp_two_replicas_of_two_devices_serve_through_one_port(tiny_llama: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [console_script("xlserve"), "serve", "api_server", str(tiny_llama), "--model-name", "tiny",
               "--server-name", "127.0.0.1", "--server-port", str(port), "--dp", "2", "--tp", "2", "--api-keys", KEY,
               "--no-engine-process", *SMALL_BUCKET_FLAGS]
    server = ServerProcess(command, env=FOUR_DEVICES)
    try:
        server.wait_until(lambda: "2 replicas of tiny ready" in server.output(), STARTUP_TIMEOUT_S)
        client = openai_client(f"{base}/v1", KEY, max_retries=0, timeout=120)
        assert [model.id for model in client.models.list().data] == ["tiny"]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(
                lambda i: client.completions.create(model="tiny", prompt=f"hi {i}", max_tokens=8,
                                                    extra_body={"ignore_eos": True}), range(16)))
        assert all(answer.usage.completion_tokens == 8 for answer in answers)
        with pytest.raises(openai.AuthenticationError):
            openai_client(f"{base}/v1", "wrong", max_retries=0).models.list()
        metrics = http.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        sent = {sample.labels["node"]: sample.value for family in text_string_to_metric_families(metrics)
                for sample in family.samples if sample.name == "xlserve:proxy_node_requests_total"}
        assert len(sent) == 2 and all(count >= 1 for count in sent.values()), f"both replicas serve: {sent}"
        assert all(url.startswith("http://127.0.0.1:") for url in sent), "replicas listen on loopback only"
        assert http.get(f"{base}/nodes/status", headers={"Authorization": f"Bearer {KEY}"}).status_code == 403
    finally:
        status = server.stop(signal.SIGTERM)
    assert status == 0, server.output()
    assert server.output().count("registered http://127.0.0.1:") == 2


def test_dp_with_more_devices_than_the_host_has_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in FOUR_DEVICES.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "api_server", "--dp", "3", "--tp", "2"])
    assert exited.value.code == 2
    assert "--dp 3 x --tp 2 needs 6 devices; this host has 4 (cpu)" in capsys.readouterr().err
