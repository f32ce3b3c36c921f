"""A stand-in for the Hugging Face hub on 127.0.0.1: the few routes huggingface_hub 2.x calls to download a
snapshot, answered the way the hub answers them, so model.source is tested against the real library.

`snapshot_download` calls, in order (read from huggingface_hub's `_snapshot_download.py`, `hf_api.py` and
`file_download.py`):
- `GET /api/models/{org}/{name}/revision/{revision}`: the repository's info; the library reads `sha`, the
  commit the revision names (skipped when the revision is already a 40-digit commit);
- `GET /api/models/{org}/{name}/tree/{commit}?recursive=...`: every file (`type`, `path`, `size`, `oid`),
  which `allow_patterns` filters;
- per file, `HEAD` then `GET /{org}/{name}/resolve/{commit}/{path}`: the HEAD must carry `X-Repo-Commit`,
  an `ETag` (the cache's blob name) and `Content-Length`, or the library refuses the endpoint.
Any request first makes the library fetch `GET /api/agent-harnesses` (once a day, for its User-Agent
telemetry; answered with an empty registry here, as HF_HUB_DISABLE_TELEMETRY=1 would skip it).
Errors carry the hub's `X-Error-Code` / `X-Error-Message` headers, which the library turns into its
exception types: `RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo` (no token for a gated
repository) and the message "Invalid credentials in Authorization header" (a token the hub does not know).
Every request is recorded, so a test can say what was (never) fetched; a route the hub does not have is
recorded too, and answered 404, so a library that starts calling a new route fails the tests that look.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit (40 hex digits) -> path -> content
    refs: dict[str, str]  # branch or tag -> commit
    token: str | None = None  # a gated repository: only this token may read it

    def commit(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


def commit_id(label: str) -> str:
    """A made-up commit id: 40 hex digits, as the library expects of one."""
    return hashlib.sha1(label.encode()).hexdigest()


@dataclass
class StandInHub:
    repos: Mapping[str, Repo]
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path), in order
    unknown_routes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hub._answer(self, with_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, with_body=False)

            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fetched(self, repo_id: str) -> set[str]:
        """The paths of `repo_id`'s files that were downloaded (GET), at any commit."""
        prefix = f"/{repo_id}/resolve/"
        return {path[len(prefix):].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and path.startswith(prefix)}

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ----- the routes -----------------------------------------------------------------------------

    def _answer(self, request: BaseHTTPRequestHandler, with_body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path))
        parts = path.strip("/").split("/")
        if path == "/api/agent-harnesses":
            return _send_json(request, {"standardEnvVars": [], "harnesses": {}}, with_body)
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
            repo_id, route, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            file_path = None
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, route, revision, file_path = f"{parts[0]}/{parts[1]}", "resolve", parts[3], "/".join(parts[4:])
        else:
            self.unknown_routes.append(f"{request.command} {path}")
            return _send(request, 404, {"X-Error-Message": "no such route on the stand-in hub"}, b"", with_body)

        repo = self.repos.get(repo_id)
        if repo is None:
            return _send(request, 404, {"X-Error-Code": "RepoNotFound"}, b"", with_body)
        refusal = _refusal(repo, repo_id, request.headers.get("Authorization"))
        if refusal is not None:
            return _send(request, 401, refusal, b"", with_body)
        commit = repo.commit(revision)
        if commit is None:
            return _send(request, 404, {"X-Error-Code": "RevisionNotFound"}, b"", with_body)
        files = repo.commits[commit]
        if route == "revision":
            info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": name} for name in sorted(files)]}
            return _send_json(request, info, with_body)
        if route == "tree":
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(files.items())]
            return _send_json(request, tree, with_body)
        if file_path not in files:
            return _send(request, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"", with_body)
        data = files[file_path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        _send(request, 200, headers, data, with_body)


def _refusal(repo: Repo, repo_id: str, authorization: str | None) -> dict[str, str] | None:
    """The hub's 401 headers for a gated repository read without a token, or with a token it does not know."""
    if repo.token is None or authorization == f"Bearer {repo.token}":
        return None
    if authorization is None:
        return {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {repo_id} is restricted."}
    return {"X-Error-Message": "Invalid credentials in Authorization header"}


def _send_json(request: BaseHTTPRequestHandler, value: object, with_body: bool) -> None:
    _send(request, 200, {"Content-Type": "application/json"}, json.dumps(value).encode(), with_body)


def _send(request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, with_body: bool) -> None:
    request.send_response(status)
    for name, value in headers.items():
        request.send_header(name, value)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if with_body:
        request.wfile.write(body)
