"""Which engine a launch gets, its weights loaded (`load_engine`).

Apart from the app factory on purpose: it imports only what starting the engine needs, so the CLI starts
the engine process before it imports the HTTP stack (Quart, the routes, transformers), which then load
in the server process while the engine process imports JAX and reads the weights.
"""

from __future__ import annotations

import multiprocessing

from model.source import resolve_model
from serving.engine.client import EngineClient
from serving.engine.multihost import resolve_group
from serving.engine.process import EngineProcess
from serving.engine.progress import StartupListener
from serving.http.options import Launch


def load_engine(launch: Launch, on_startup: StartupListener | None = None) -> EngineClient:
    """The launch's engine, its weights loaded: in a child process of its own unless
    `--no-engine-process` (serving.engine.process says why), or unless this process is itself a
    daemonic worker (`hypercorn serving.app:app`), which multiprocessing does not let start children.
    A hub id is downloaded here, in this process, so its progress and errors show where it was started.
    `on_startup` hears of the load's progress, and of the buckets' compilation once the engine starts."""
    config = launch.engine_config
    group = resolve_group(config.nnodes, config.node_rank, config.dist_init_addr, config.dist_timeout,
                          config.dist_init_timeout)
    if group is not None and not group.is_leader:
        raise ValueError(f"rank {group.node_rank} follows rank 0 and serves no API: start it with "
                         "`xlserve serve api_server` (docs/multi-host.md)")
    model_path = None
    if launch.model is not None:
        weights = launch.engine_config.load_format != "dummy"
        model_path = resolve_model(launch.model, launch.revision, launch.download_dir, weights=weights)
    if launch.settings.engine_process and not multiprocessing.current_process().daemon:
        return EngineProcess.from_pretrained(model_path, launch.engine_config, launch.log_level, on_startup)
    from serving.engine.engine import Engine

    return Engine.from_pretrained(model_path, launch.engine_config, on_startup)
