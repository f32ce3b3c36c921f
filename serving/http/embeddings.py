"""POST /v1/embeddings: one vector per input, from the model's last hidden state at the input's last token.

What the vector is: the final norm's output at the prompt's last token (the hidden state the LM head reads),
normalized to unit length (`serving.text.pooling`): last-token pooling, as the decoder-only embedding models trained
for it use (Qwen3-Embedding, gte-Qwen2, e5-mistral) and as vLLM pools a causal LM served for embeddings. The
engine runs each input as a prompt-only request (`EngineRequest.embed`), in the same steps and through the same
admission, deadlines and prefix cache as generation. Strings are encoded as /v1/completions encodes them (the
tokenizer's special tokens added: an embedding model's tokenizer appends the end token it pools at).
"""

from __future__ import annotations

import base64
import functools
import uuid
from typing import Any

import numpy as np
from quart import Blueprint
from quart_schema import document_request, document_response

from serving.http.body import read_body
from serving.http.choices import fan_out, generate
from serving.http.engine_client import collect
from serving.http.errors import APIError
from serving.http.openapi import document_errors
from serving.http.params import prompt_too_long
from serving.http.prompts import completion_prompt_chars, completion_prompt_ids
from serving.http.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from serving.http.state import server_state
from serving.request import GenerationConfig
from serving.text.pooling import pooled
from serving.text.tokenizer import PromptTooLong

blueprint = Blueprint("embeddings", __name__)


@blueprint.post("/v1/embeddings")
@document_request(EmbeddingRequest)
@document_response(EmbeddingResponse, 200)
@document_errors(400, 404, 408, 413, 500, 503)
async def embeddings() -> dict[str, Any]:
    """Create embeddings.

    Each input (a string, or token ids) gets one unit-length vector of the model's hidden size (or of
    `dimensions`), in input order; `encoding_format: base64` sends each as its float32 bytes.
    """
    body = await read_body(EmbeddingRequest)
    state = server_state()
    state.require_model(body.model)
    state.require_ready()
    engine = state.engine
    hidden_size = engine.model_config.hidden_size
    if body.dimensions is not None and body.dimensions > hidden_size:
        raise APIError(400, f"dimensions may be at most the model's hidden size, {hidden_size}; got {body.dimensions}",
                       param="dimensions")
    if body.input == "" or isinstance(body.input, list) and "" in body.input:
        raise APIError(400, "input may not hold an empty string", param="input")
    prepare = functools.partial(completion_prompt_ids, engine.tokenizer, body.input, engine.max_session_len - 1)
    try:
        prompts = await state.prepare_prompt(completion_prompt_chars(body.input), prepare)
    except PromptTooLong as error:
        raise prompt_too_long(error, engine.max_session_len, "input") from None
    requests = fan_out(engine, prompts, GenerationConfig(max_new_tokens=0), 1, f"embd-{uuid.uuid4().hex}",
                       state.settings.max_log_len)
    for request in requests:
        request.embed = True
    results = await collect(generate(state.engine_client, requests), len(requests))
    if any(r.embedding is None for r in results):  # the engine ended a request without its hidden state
        raise APIError(500, "the engine returned no embedding", code="engine_error")
    vectors = [pooled(r.embedding, body.dimensions) for r in results]
    encode = _base64 if body.encoding_format == "base64" else np.ndarray.tolist
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=encode(vector)) for i, vector in enumerate(vectors)],
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=sum(map(len, prompts)), total_tokens=sum(map(len, prompts))),
    ).model_dump()


def _base64(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
