"""The proxy's own request and response bodies: LMDeploy's /nodes/* bodies, its readiness, and the
fields it reads of an interactive request. The OpenAI routes document the api_server's schemas
(`serving.http.protocol`), which the nodes validate."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel


class AnyBody(BaseModel):
    """A JSON object: what the proxy reads of a request before relaying it (the node validates it)."""

    model_config = ConfigDict(extra="allow")


class NodeStatusIn(BaseModel):
    """LMDeploy's `status` of a node being added. `models` is checked against the node's /v1/models."""

    model_config = ConfigDict(extra="ignore")

    models: list[str] | None = None
    speed: float | None = Field(None, gt=0, description="Relative speed: weights `random`, divides load.")
    role: str | None = Field("Hybrid", description="Only Hybrid (prefill and decode) nodes are served.")


class NodeRequest(BaseModel):
    """LMDeploy's body of POST /nodes/add and /nodes/remove."""

    model_config = ConfigDict(extra="ignore")

    url: str = Field(description="The node's base URL, e.g. http://10.0.0.5:23333.")
    status: NodeStatusIn | None = None


class NodeStatus(BaseModel):
    """One node in GET /nodes/status: LMDeploy's fields, then the proxy's."""

    role: str
    models: list[str]
    unfinished: int = Field(description="Requests relayed to it and not finished.")
    latency: list[float] = Field(description="Its last request latencies, in seconds.")
    speed: float | None
    healthy: bool = Field(description="In rotation: ready, and not failed since.")
    failures: int = Field(description="Server errors in a row.")
    block_size: int | None = Field(description="Its KV page size in tokens (vllm:cache_config_info).")
    num_gpu_blocks: int | None
    enable_prefix_caching: bool | None


class NodesStatus(RootModel[dict[str, NodeStatus]]):
    """Every registered node, by URL."""


class NodeRemoved(BaseModel):
    url: str
    removed: bool


class ProxyReadiness(BaseModel):
    ready: bool
    nodes: int = Field(description="Nodes in rotation.")


class InteractiveFields(BaseModel):
    """What the proxy reads of a /v1/chat/interactive request; every other field goes to the node as sent
    (see the api_server's InteractiveRequest)."""

    model_config = ConfigDict(extra="allow")

    prompt: Any = None
    session_id: int | None = Field(-1, description="The session; its turns all go to the node that holds it.")
    interactive_mode: bool | None = False
    model: str | None = Field(None, description="Optional: limits the nodes to those serving this model.")
