"""`hypercorn serving.app:app`: the server, configured only from the environment.

`XLSERVE_MODEL` is the checkpoint directory (unset: the built-in demo model); every flag of
`xlserve serve api_server` has a variable named after it (`--session-len` → `XLSERVE_SESSION_LEN`,
`--api-keys` → `XLSERVE_API_KEYS=key1,key2`). Weights load at import; the buckets compile in the
background once Hypercorn serves, while GET /v1/ready answers 503.
"""

from __future__ import annotations

import logging

from serving.engine.engine import Engine
from serving.http.factory import create_app
from serving.http.options import from_environment

launch = from_environment()
logging.basicConfig(level=launch.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app(Engine.from_pretrained(launch.model_path, launch.engine_config), launch.settings)
