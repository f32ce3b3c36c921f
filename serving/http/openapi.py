"""The OpenAPI document, made friendlier to client generators than quart-schema's default.

quart-schema inlines each route's own request and response model, so openapi-generator would emit
anonymous types (`InlineObject1`); here every model lands in `components/schemas` under its class
name and routes refer to it. Routes that can stream also document their `text/event-stream` answer
(`streams(ChunkModel)`), and routes that answer plain text say so (`text_response(media_type)`):
quart-schema has decorators for neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from quart_schema import OpenAPIProvider, document_response
from quart_schema.validation import DataSource
from werkzeug.routing import Rule

from serving.http.protocol import ErrorResponse

F = TypeVar("F", bound=Callable[..., Any])

_STREAM_ATTRIBUTE = "_xlserve_stream_model"
_NDJSON_ATTRIBUTE = "_xlserve_ndjson_model"
_TEXT_ATTRIBUTE = "_xlserve_text_media_type"


def document_errors(*statuses: int) -> Callable[[F], F]:
    """Document OpenAI's error envelope (`ErrorResponse`) as the answer of each of these statuses."""

    def decorate(func: F) -> F:
        for status in statuses:
            func = document_response(ErrorResponse, status)(func)
        return func

    return decorate


def streams(chunk_model: type[BaseModel]) -> Callable[[F], F]:
    """Document that with `stream: true` the 200 answer is SSE events of `chunk_model`."""

    def decorate(func: F) -> F:
        setattr(func, _STREAM_ATTRIBUTE, chunk_model)
        return func

    return decorate


def ndjson_stream(line_model: type[BaseModel]) -> Callable[[F], F]:
    """Document that with `stream: true` the 200 answer is NDJSON: one `line_model` per line."""

    def decorate(func: F) -> F:
        setattr(func, _NDJSON_ATTRIBUTE, line_model)
        return func

    return decorate


def text_response(media_type: str) -> Callable[[F], F]:
    """Document that the 200 answer is text of `media_type` rather than JSON."""

    def decorate(func: F) -> F:
        setattr(func, _TEXT_ATTRIBUTE, media_type)
        return func

    return decorate


def _named(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """Move a top-level schema into the components under its title; return a reference to it."""
    definitions[schema["title"]] = schema
    return {"$ref": f"#/components/schemas/{schema['title']}"}


class NamedSchemaProvider(OpenAPIProvider):
    def build_request_body(self, model: type[BaseModel], source: DataSource) -> tuple[dict, dict]:
        body, definitions = super().build_request_body(model, source)
        for media in body["content"].values():
            media["schema"] = _named(media["schema"], definitions)
        body["required"] = True  # a route that documents a body refuses a request without one
        return body, definitions

    def build_response_object(self, model: type[BaseModel], headers_model: type[BaseModel] | None) -> tuple[dict, dict]:
        response, definitions = super().build_response_object(model, headers_model)
        media = response["content"]["application/json"]
        media["schema"] = _named(media["schema"], definitions)
        return response, definitions

    def _component(self, model: type[BaseModel], components: dict) -> dict[str, Any]:
        """A reference to `model`'s schema, added to `components`."""
        response, definitions = super().build_response_object(model, None)
        components.update(definitions)
        return _named(response["content"]["application/json"]["schema"], components)

    def build_paths(self, rule: Rule) -> tuple[dict, dict]:
        paths, components = super().build_paths(rule)
        view = self._app.view_functions[rule.endpoint]
        media_type = getattr(view, _TEXT_ATTRIBUTE, None)
        if media_type is not None:
            for operation in paths[next(iter(paths))].values():
                operation["responses"][200] = {
                    "description": "OK",
                    "content": {media_type: {"schema": {"type": "string"}}},
                }
        line_model = getattr(view, _NDJSON_ATTRIBUTE, None)
        if line_model is not None:
            line = self._component(line_model, components)
            error = self._component(ErrorResponse, components)  # an error after the stream began
            for operation in paths[next(iter(paths))].values():
                operation["responses"][200]["content"]["application/x-ndjson"] = {
                    # One JSON document per line; OpenAPI 3.1 can only describe the text as a whole.
                    "schema": {"type": "string", "description": f"Lines of JSON: each a {line_model.__name__} "
                               "(or, after a failure, an ErrorResponse)."},
                    "x-ndjson-line-schema": {"anyOf": [line, error]},
                }  # fmt: skip
        chunk_model = getattr(view, _STREAM_ATTRIBUTE, None)
        if chunk_model is not None:
            chunk = self._component(chunk_model, components)
            error = self._component(ErrorResponse, components)  # an error after the stream began
            for operation in paths[next(iter(paths))].values():
                operation["responses"][200]["content"]["text/event-stream"] = {
                    # Before OpenAPI 3.2 (`itemSchema`), `schema` describes one event of the stream.
                    "schema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "data": {
                                "description": f"A {chunk_model.__name__} (or, after a failure, an ErrorResponse) "
                                "as JSON; the last event is `[DONE]`.",
                                "anyOf": [
                                    {"const": "[DONE]"},
                                    {
                                        "type": "string",
                                        "contentMediaType": "application/json",
                                        "contentSchema": {"anyOf": [chunk, error]},
                                    },
                                ],
                            },
                        },
                    },
                    "x-sse-event-schema": chunk,
                }
        return paths, components
