"""POST /v1/embeddings, live: the openai SDK against the tiny Llama checkpoint, each vector checked against
transformers' last hidden state at the input's last token (the final norm's output), normalized; token-id
inputs, `dimensions`, both encodings; the errors, each a 4xx in OpenAI's format; nothing left running."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from tests.http_fixtures import LiveServer, http, shared_http_server  # noqa: F401 (the `http_server` fixture)

TEXTS = ["The cat sat on the mat.", "A quick brown fox", "x"]


def reference(hf_tiny, ids: list[int], dimensions: int | None = None) -> np.ndarray:
    """transformers' final-norm output at the last token, its first `dimensions` values, unit length."""
    with torch.no_grad():
        hidden = hf_tiny(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    vector = hidden[:dimensions]
    return vector / np.linalg.norm(vector)


def post(server: LiveServer, **body) -> dict:
    response = http.post(f"{server.base_url}/v1/embeddings", json={"model": server.model_name, **body})
    return {"status": response.status_code, **response.json()}


def test_the_sdk_gets_transformers_last_hidden_state_per_input(http_server: LiveServer, hf_tiny) -> None:
    result = http_server.client().embeddings.create(model=http_server.model_name, input=TEXTS)  # base64 on the wire
    ids = [http_server.engine.tokenizer.encode(text) for text in TEXTS]
    assert [d.index for d in result.data] == [0, 1, 2] and result.model == http_server.model_name
    for data, prompt in zip(result.data, ids, strict=True):
        vector = np.asarray(data.embedding)
        assert vector.shape == (http_server.engine.model_config.hidden_size,)
        np.testing.assert_allclose(vector, reference(hf_tiny, prompt), atol=2e-5)
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(map(len, ids))
    assert http_server.engine.wait_idle() and http_server.engine.stats().num_pages_used == 0


def test_token_ids_dimensions_and_both_encodings(http_server: LiveServer, hf_tiny) -> None:
    # The second is prefilled in two chunks, the third's last chunk is its last token alone.
    prompts = [[5, 6, 7, 8], [9] * 70, [11] * 65]
    floats = post(http_server, input=prompts, dimensions=8, encoding_format="float")
    assert floats["status"] == 200 and floats["object"] == "list"
    for data, prompt in zip(floats["data"], prompts, strict=True):
        assert data["object"] == "embedding" and len(data["embedding"]) == 8
        np.testing.assert_allclose(data["embedding"], reference(hf_tiny, prompt, 8), atol=2e-5)
    packed = post(http_server, input=prompts[0], dimensions=8, encoding_format="base64")["data"][0]["embedding"]
    # alone, not batched with the 70-token prompt: another step shape, the same vector to float32 rounding
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(packed), "<f4"), floats["data"][0]["embedding"],
                               atol=1e-6)
    assert floats["usage"] == {"prompt_tokens": 139, "total_tokens": 139}


def test_an_input_asked_twice_gets_the_same_vector_from_the_prefix_cache(http_server: LiveServer) -> None:
    first, again = (post(http_server, input="The same words, twice over.")["data"][0]["embedding"] for _ in range(2))
    np.testing.assert_allclose(first, again, atol=1e-6)


@pytest.mark.parametrize(
    "body, status, param",
    [
        (dict(input=""), 400, "input"),
        (dict(input=["a", ""]), 400, "input"),
        (dict(input=[[]]), 400, "input"),
        (dict(input=[]), 400, "input"),
        (dict(input="hi", dimensions=0), 400, "dimensions"),
        (dict(input="hi", dimensions=100_000), 400, "dimensions"),
        (dict(input="hi", encoding_format="int8"), 400, "encoding_format"),
        (dict(input=[5] * 500), 400, None),  # past the session length
        (dict(input="word " * 500), 400, "input"),
        (dict(input=[-1]), 400, "input"),
        (dict(input=[10**6]), 400, None),  # past the vocabulary
        (dict(input="hi", model="nope"), 404, None),
    ],
)
def test_bad_requests_are_4xx_in_openais_format(http_server: LiveServer, body, status, param) -> None:
    answer = post(http_server, **body)
    assert answer["status"] == status, answer
    assert set(answer["error"]) >= {"message", "type", "code"}
    if param is not None:
        assert answer["error"]["param"].startswith(param)  # pydantic names the item: input[0]
    assert http_server.engine.wait_idle() and http_server.engine.stats().num_pages_used == 0
