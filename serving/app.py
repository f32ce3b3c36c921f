"""`hypercorn serving.app:app`: the server, configured only from the environment.

`XLSERVE_MODEL` is a checkpoint directory or a Hugging Face hub id (unset: the built-in demo model);
every flag of `xlserve serve api_server` has a variable named after it (`--session-len` →
`XLSERVE_SESSION_LEN`, `--revision` → `XLSERVE_REVISION`, `--api-keys` → `XLSERVE_API_KEYS=key1,key2`).
A hub id downloads and the weights load at import; the buckets compile in the
background once Hypercorn serves, while GET /v1/ready answers 503. Hypercorn's workers are daemonic
processes, which may not start children, so here the engine runs on a thread of the worker (the
`xlserve` CLI runs it in a process of its own).
"""

from __future__ import annotations

import logging

from serving.http.engine_loader import load_engine
from serving.http.factory import create_app
from serving.http.options import OptionError, from_environment

launch = from_environment()
if launch.proxy_url is not None or launch.dp != 1:
    # Both need the CLI's own process: it registers with the proxy, or starts the replicas.
    raise OptionError("XLSERVE_PROXY_URL and XLSERVE_DP need `xlserve serve api_server`; under Hypercorn, add the "
                      "server to a proxy with POST /nodes/add or its --node-file")
logging.basicConfig(level=launch.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app(load_engine(launch), launch.settings)
