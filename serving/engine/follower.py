"""A follower host of a multi-host group (`--node-rank` > 0): no HTTP API, no scheduler, only the runner.

It joins the group, loads its own shards, compiles the same buckets as the leader, then replays every step
plan the leader sends (`serving.engine.multihost`). For Kubernetes probes it answers `GET /health` (and
`/v1/ready`) on the same port the leader serves its API on, so one pod template fits every rank: 200 while
it follows, 503 before that. It exits 0 when the leader stops the group, and non-zero when the leader is
lost or a plan is bad, so the group restarts together.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serving.engine.config import EngineConfig
from serving.engine.multihost import EXIT_LOST_PEER, PeerLost, PlanError, connect_to_leader, follow, resolve_group

logger = logging.getLogger(__name__)

PROBE_PATHS = ("/health", "/v1/ready")


class _Status:
    def __init__(self, rank: int):
        self.rank = rank
        self.following = False
        self.engine = None

    def body(self) -> dict:
        stats = self.engine.stats() if self.engine is not None and self.following else None
        return {"rank": self.rank, "following": self.following,
                "compilations_after_warmup": stats.compilations_after_warmup if stats else None}


def _serve_probes(status: _Status, host: str, port: int) -> ThreadingHTTPServer:
    class Probe(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path not in PROBE_PATHS:
                self.send_error(404, "a follower answers only /health and /v1/ready")
                return
            body = json.dumps(status.body()).encode()
            self.send_response(200 if status.following else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # probes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Probe)
    threading.Thread(target=server.serve_forever, name="xlserve-probes", daemon=True).start()
    return server


def _stop_now(signum: int, frame: object) -> None:
    print("xlserve: follower stopped by a signal", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(0)


def run_follower(model_path: str | None, config: EngineConfig, host: str, port: int) -> int:
    """Follow the leader until it stops the group; the process's exit status."""
    from serving.engine.engine import Engine

    group = resolve_group(config.nnodes, config.node_rank, config.dist_init_addr, config.dist_timeout,
                          config.dist_init_timeout)
    assert group is not None and not group.is_leader, "run_follower is for ranks > 0"
    status = _Status(group.node_rank)
    probes = _serve_probes(status, host, port)
    try:
        engine = Engine.from_pretrained(model_path, config)  # joins the group first
        # Joining installed jax.distributed's SIGTERM handler, which notes a preemption and carries on; a pod
        # being stopped must stop. A normal exit would wait on the leader at JAX's shutdown barrier.
        signal.signal(signal.SIGTERM, _stop_now)
        engine.warm_up()
        link = connect_to_leader(group)
    except Exception as error:
        print(f"xlserve: error: rank {group.node_rank} could not start: {error}", file=sys.stderr, flush=True)
        return 1
    status.engine, status.following = engine, True
    print(f"xlserve: rank {group.node_rank} of {group.nnodes} following the leader at {group.coordinator}",
          file=sys.stderr, flush=True)
    in_flight = []

    def run(chunks: list, rows: int, tokens: int, packed: int | None, decode: int) -> None:
        # Waiting for the step before last keeps this host at most one step ahead, as the leader's loop is.
        tokens_out = engine.runner.run(chunks, rows, tokens, packed, decode).tokens
        if in_flight:
            in_flight.pop().block_until_ready()
        in_flight.append(tokens_out)

    try:
        follow(link, run, group.timeout)
    except (PeerLost, PlanError) as error:
        status.following = False
        print(f"xlserve: error: rank {group.node_rank} lost the leader: {error}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_LOST_PEER)  # a collective with the dead leader could block a normal exit forever
    status.following = False
    probes.shutdown()
    return 0
