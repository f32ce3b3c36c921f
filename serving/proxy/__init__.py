"""`xlserve serve proxy`: one address in front of many api_servers (LMDeploy's `serve proxy`, its routes
and flags), with cache-aware and session routing, real HTTP errors, retries and health checks.

The proxy never imports the engine or JAX: it speaks HTTP to its nodes, which may be ours or LMDeploy's.
Modules: `settings` (what it is configured with), `nodes` (the registry and its file), `probe` (what a
node serves, and the health checks), `prompt_pages` and `routing` (where a request goes), `forward`
(relaying a request and its stream), `auth`, `metrics`, `app` (the Quart app), `server` (Hypercorn and
signals) and `replicas` (`xlserve serve api_server --dp N`: N local servers behind one proxy).
"""
