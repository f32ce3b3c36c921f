"""POST /v1/encode: LMDeploy's tokenizer route, which its `APIClient.encode` uses to count tokens.

`input` is a string or a list of strings; the answer is `{input_ids, length}`, a list and a count for a
string, a list of each for a list. `do_preprocess: true` first renders the input as one user message
through the chat template (what /v1/chat/completions would prompt the model with, so the count is
the one that counts against the session); `add_bos: false` leaves the tokenizer's special tokens out.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from quart import Blueprint
from quart_schema import document_request, document_response

from serving.http.body import read_body
from serving.http.openapi import document_errors
from serving.http.prompts import chat_prompt
from serving.http.protocol import MAX_N, ChatMessage, lax
from serving.http.state import server_state
from serving.text.templates import ChatTemplate
from serving.text.tokenizer import Tokenizer

blueprint = Blueprint("encode", __name__)


class EncodeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)  # as protocol's requests

    input: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[str], Tag("strings"), Field(min_length=1, max_length=MAX_N)],
        Discriminator(lambda v: "string" if isinstance(v, str) else "strings"),
    ] = Field(description="A text, or a list of texts.")
    do_preprocess: lax(bool) | None = Field(False, description="Render each text as a user message first.")
    add_bos: lax(bool) | None = Field(True, description="Add the tokenizer's special tokens (its BOS).")


class EncodeResponse(BaseModel):
    input_ids: list[int] | list[list[int]]
    length: int | list[int]


@blueprint.post("/v1/encode")
@document_request(EncodeRequest)
@document_response(EncodeResponse, 200)
@document_errors(400, 413, 503)
async def encode() -> dict[str, Any]:
    """Token ids of a text (or of each of a list of texts) and their count."""
    body = await read_body(EncodeRequest)
    state = server_state()
    state.require_ready()
    texts = [body.input] if isinstance(body.input, str) else body.input
    ids = await asyncio.to_thread(
        _encode_all, state.engine.tokenizer, texts, bool(body.do_preprocess), body.add_bos is not False,
        state.settings.chat_template,
    )  # fmt: skip
    if isinstance(body.input, str):
        return EncodeResponse(input_ids=ids[0], length=len(ids[0])).model_dump()
    return EncodeResponse(input_ids=ids, length=[len(i) for i in ids]).model_dump()


def _encode_all(
    tokenizer: Tokenizer, texts: list[str], preprocess: bool, add_bos: bool, template: ChatTemplate | None
) -> list[list[int]]:
    if preprocess:  # the template writes the BOS and every other special token itself
        return [chat_prompt(tokenizer, [ChatMessage(role="user", content=t)], None, template).token_ids for t in texts]
    return [tokenizer.encode(text, add_special_tokens=add_bos) for text in texts]
