"""LMDeploy's node routes, `/nodes/status`, `/nodes/add` and `/nodes/remove`, with its request bodies,
behind the admin keys (`serving.proxy.auth`).

Adding a node probes it first (`probe.probe_node`): a URL whose /v1/models does not answer is refused
with 502 rather than registered on the caller's word, and a node that is not ready yet is registered
out of rotation until the health checks find it ready. Answers are JSON objects in the proxy's
error envelope when they fail (LMDeploy answered strings such as 'Failed to add').
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from quart import Blueprint, request
from quart_schema import document_request, document_response

from serving.http.body import validation_error
from serving.http.errors import APIError
from serving.http.openapi import document_errors
from serving.proxy.nodes import HYBRID, normalize_url
from serving.proxy.probe import ProbeError, probe_node
from serving.proxy.protocol import NodeRemoved, NodeRequest, NodesStatus, NodeStatus
from serving.proxy.state import proxy_state

blueprint = Blueprint("nodes", __name__)


async def _node_request() -> tuple[NodeRequest, str]:
    try:
        node = NodeRequest.model_validate_json(await request.get_data(cache=False))
    except ValidationError as error:
        raise validation_error(error) from None
    try:
        return node, normalize_url(node.url)
    except ValueError as error:
        raise APIError(400, str(error), param="url") from None


@blueprint.get("/nodes/status")
@document_response(NodesStatus, 200)
async def status() -> dict[str, Any]:
    """Every registered node by URL: LMDeploy's status fields (role, models, unfinished, latency, speed),
    then whether it is in rotation and its KV-cache configuration."""
    return {node.url: node.status() for node in proxy_state().registry}


@blueprint.post("/nodes/add")
@document_request(NodeRequest)
@document_response(NodeStatus, 200)
@document_errors(400, 502)
async def add() -> dict[str, Any]:
    """Add (or refresh) a node: `{url, status?: {models, speed, role}}`. Its /v1/models is checked
    first, and must list any `status.models` given; it takes requests once its /v1/ready answers 200."""
    node_request, url = await _node_request()
    given = node_request.status
    if given is not None and (given.role or HYBRID) != HYBRID:
        raise APIError(400, f"role {given.role!r}: this proxy serves Hybrid nodes only", param="status.role")
    state = proxy_state()
    try:
        facts = await probe_node(state.client, url, state.node_headers)
    except ProbeError as error:
        state.metrics.errors.labels("node_unreachable").inc()
        raise APIError(502, f"cannot add {url}: {error}", param="url", code="node_unreachable") from None
    names = [card["id"] for card in facts.models]
    if given is not None and given.models and not set(given.models) <= set(names):
        raise APIError(400, f"{url} serves {names}, not {given.models}", param="status.models")
    node = state.registry.add(url, facts, speed=given.speed if given else None)
    state.forget(node)  # a node (re)registering may have restarted: its cache is empty
    return node.status()


@blueprint.post("/nodes/remove")
@document_request(NodeRequest)
@document_response(NodeRemoved, 200)
@document_errors(404)
async def remove() -> dict[str, Any]:
    """Remove a node (`{url}`, as a JSON body): it gets no new requests; those in flight finish."""
    _, url = await _node_request()
    state = proxy_state()
    node = state.registry.remove(url)
    if node is None:
        raise APIError(404, f"{url} is not a registered node", param="url", code="node_not_found")
    state.forget(node)
    return NodeRemoved(url=url, removed=True).model_dump()
