"""One server end to end with both quantizations on (`--quant-policy 8 --weight-quant int8`), through the
openai SDK: it starts, says so on its ready line, and serves completions, streamed or not."""

from __future__ import annotations

import re

from tests.http_fixtures import SMALL_BUCKET_FLAGS, ServerProcess, console_script, free_port, http, openai_client


def test_a_server_with_int8_kv_pages_and_int8_weights_serves_the_openai_api(tiny_llama):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [console_script("xlserve"), "serve", "api_server", str(tiny_llama), "--server-name", "127.0.0.1",
               "--server-port", str(port), "--model-name", "tiny", "--quant-policy", "8", "--weight-quant", "int8",
               *SMALL_BUCKET_FLAGS]
    server = ServerProcess(command)
    try:
        server.wait_ready(base)
        server.wait_until(lambda: "ready after" in server.output())
        assert re.search(r"ready after [\d.]+s: float32 \(int8 weights, int8 KV\), TP 1, 32 KV pages of 16 tokens",
                         server.output()), server.output()
        client = openai_client(f"{base}/v1", "none", max_retries=0)
        completion = client.completions.create(model="tiny", prompt="The lighthouse", max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 8 and completion.choices[0].finish_reason == "length"
        stream = client.completions.create(model="tiny", prompt="The lighthouse", max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == completion.choices[0].text
        metrics = http.get(f"{base}/metrics").text
        assert re.search(r'cache_config_info\{[^}]*num_gpu_blocks="32"', metrics), metrics
    finally:
        server.stop()
