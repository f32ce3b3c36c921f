"""The documented layering holds (docs/architecture.md): every import of our own code, at module level or
inside a function, goes down the layers, and no two layers import each other.

    http (serving/http, serving/proxy, serving/cli.py, serving/app.py)  ->  text, engine, offline
    offline (serving/offline.py: pipeline())              ->  text, engine, model (its source)
    text (serving/text)                                   ->  request
    engine (serving/engine)                               ->  request, model, xlkernels, configs
                                                              and the tokenizer (serving.text.tokenizer),
                                                              which the engine loads for its EOS ids
    request (serving/request.py: the records every layer passes)
    model -> xlkernels;  configs (data) -> model's types;  xlkernels -> nothing of ours
    client (serving/client.py: APIClient) speaks HTTP only: nothing of ours
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("serving", "model", "xlkernels", "configs")

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "http": {"text", "engine", "offline", "request", "model", "configs", "xlkernels", "root", "client"},
    "offline": {"text", "engine", "request", "model"},
    "root": {"offline", "request"},  # serving/__init__.py's lazy exports
    "text": {"request"},
    "engine": {"request", "model", "xlkernels", "configs"},
    "request": set(),
    "model": {"xlkernels"},
    "configs": {"model"},
    "xlkernels": set(),
    "client": set(),
}
# The engine loads the checkpoint's tokenizer for its EOS ids, and hands it to the server's text layer.
EXCEPTIONS = {("engine", "serving.text.tokenizer")}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "serving":
        return parts[0]
    rest = parts[1] if len(parts) > 1 else "__init__"
    return {"http": "http", "proxy": "http", "cli": "http", "app": "http", "engine": "engine", "text": "text",
            "offline": "offline", "request": "request", "sampling_options": "request", "client": "client",
            "__init__": "root"}[rest]


def own_imports(path: Path) -> set[str]:
    """Modules of ours that a file imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    assert len(files) > 40, "the tree was not found"
    return {module_name(path): own_imports(path) for path in files}


def test_every_import_goes_down_the_layers():
    wrong = []
    for module, imports in import_graph().items():
        source = layer(module)
        for target in imports:
            if layer(target) not in ALLOWED[source] | {source} and (source, target) not in EXCEPTIONS:
                wrong.append(f"{module} ({source}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_two_layers_import_each_other():
    edges = {(layer(m), layer(t)) for m, imports in import_graph().items() for t in imports
             if (layer(m), t) not in EXCEPTIONS}
    edges = {(a, b) for a, b in edges if a != b}
    assert not [(a, b) for a, b in edges if (b, a) in edges]


def test_the_rule_is_checked_against_a_real_violation(tmp_path):
    """The checker sees imports inside functions, where a lazy import would hide an upward one."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from serving.http.errors import APIError\n")
    assert own_imports(source) == {"serving.http.errors"}
    assert "http" not in ALLOWED["engine"]
