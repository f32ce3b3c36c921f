"""The proxy's parts that need no api_server: routing strategies on real `Node`s, prompt pages, the
node file, the proxy app in-process (keys on every route in its URL map, no healthy node, a node that
cannot be reached), its flags, `--dp`'s device plan and the URL an api_server registers."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from serving.cli import build_parser, main
from serving.engine.page_hash import page_keys
from serving.http.options import OptionError, from_arguments
from serving.http.registration import advertised_url
from serving.proxy.app import create_proxy_app
from serving.proxy.nodes import Node, NodeRegistry, normalize_url
from serving.proxy.options import PROXY_OPTIONS, proxy_from_arguments
from serving.proxy.prompt_pages import CHARS_PER_TOKEN, MAX_PAGES, PromptPages
from serving.proxy.replicas import ReplicaError, replica_environments
from serving.proxy.routing import (
    BALANCE_ABS,
    AutoStrategy,
    CacheAware,
    MinExpectedLatency,
    MinObservedLatency,
    RandomStrategy,
    RoutedRequest,
    SessionRing,
)
from serving.proxy.settings import ProxySettings

PAGE = 16


def nodes(count: int, **fields: object) -> list[Node]:
    return [Node(f"http://10.0.0.{i}:23333", healthy=True, page_size=PAGE, num_pages=64, **fields)
            for i in range(count)]


def chat(system: str, user: str, model: str = "m") -> RoutedRequest:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return RoutedRequest(model, PromptPages.of("/v1/chat/completions", body))


def words(seed: int, count: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(count))


# ---- LMDeploy's strategies ---------------------------------------------------------------------------------


def test_random_is_weighted_by_speed() -> None:
    fleet = nodes(2)
    fleet[0].speed, fleet[1].speed = 1, 3
    strategy = RandomStrategy(random.Random(0))
    counts = Counter(strategy.choose(fleet, chat("s", "u")).node.url for _ in range(4000))
    assert 2.6 < counts[fleet[1].url] / counts[fleet[0].url] < 3.4


def test_min_expected_latency_takes_the_least_loaded_per_speed_and_spreads_ties() -> None:
    fleet = nodes(3)
    fleet[0].in_flight, fleet[1].in_flight, fleet[2].in_flight = 4, 2, 3
    strategy = MinExpectedLatency(random.Random(0))
    assert strategy.choose(fleet, chat("s", "u")).node is fleet[1]
    fleet[2].speed = 2  # 3 in flight at twice the speed: 1.5 expected
    assert strategy.choose(fleet, chat("s", "u")).node is fleet[2]
    idle = nodes(3)
    assert len({strategy.choose(idle, chat("s", "u")).node.url for _ in range(60)}) == 3, "ties go everywhere"


def test_min_observed_latency_measures_new_nodes_first_then_takes_the_fastest() -> None:
    fleet = nodes(3)
    fleet[0].latencies.extend([0.5, 0.7])
    fleet[1].latencies.extend([0.2])
    strategy = MinObservedLatency(random.Random(0))
    assert strategy.choose(fleet, chat("s", "u")).node is fleet[2], "a node with no latency yet comes first"
    fleet[2].latencies.extend([0.3] * 20)
    assert len(fleet[2].latencies) == 15, "LMDeploy's window: the last 15"
    assert strategy.choose(fleet, chat("s", "u")).node is fleet[1]


# ---- cache_aware ---------------------------------------------------------------------------------------


def test_cache_aware_returns_a_prefix_to_the_node_that_saw_it() -> None:
    fleet = nodes(3)
    strategy = CacheAware(random.Random(0))
    first = strategy.choose(fleet, chat(words(1, 80), "question one"))
    assert first.branch == "cache_miss" and first.match == 0
    again = strategy.choose(fleet, chat(words(1, 80), "another question"))
    assert (again.node, again.branch) == (first.node, "cache_hit") and again.match > 0.5
    other = strategy.choose(fleet, chat(words(2, 80), "question one"))
    assert other.branch == "cache_miss" and other.node is not first.node, "a new prefix goes to a quieter node"


def test_cache_aware_goes_to_the_least_loaded_node_past_the_bound() -> None:
    fleet = nodes(2)
    strategy = CacheAware(random.Random(0))
    home = strategy.choose(fleet, chat(words(3, 80), "q")).node
    home.in_flight = BALANCE_ABS  # exactly the bound above the other (0): still home
    assert strategy.choose(fleet, chat(words(3, 80), "q2")).node is home
    home.in_flight = BALANCE_ABS + 1
    spill = strategy.choose(fleet, chat(words(3, 80), "q3"))
    assert spill.branch == "load_balance" and spill.node is not home


def test_cache_aware_keeps_eight_shuffled_groups_together_and_the_load_within_twice() -> None:
    fleet = nodes(3)
    strategy = CacheAware(random.Random(0))
    arrivals = [group for group in range(8) for _ in range(12)]
    random.Random(1).shuffle(arrivals)
    homes: dict[int, set[str]] = {}
    for i, group in enumerate(arrivals):
        choice = strategy.choose(fleet, chat(words(100 + group, 80), f"user question {i}"))
        homes.setdefault(group, set()).add(choice.node.url)
    assert all(len(urls) == 1 for urls in homes.values()), homes
    load = Counter(next(iter(urls)) for urls in homes.values() for _ in range(12))
    assert len(load) == 3 and max(load.values()) <= 2 * min(load.values()), load


def test_cache_aware_sends_prompts_shorter_than_a_page_to_the_least_loaded_node() -> None:
    fleet = nodes(3)
    strategy = CacheAware(random.Random(0))
    strategy.choose(fleet, chat(words(7, 80), "fills one node's index"))
    for busy in range(3):
        fleet[busy].in_flight = 5
        choice = strategy.choose(fleet, chat("", "hi"))
        assert choice.branch == "no_prefix" and choice.node is not fleet[busy]
        fleet[busy].in_flight = 0


def test_a_forgotten_node_starts_over() -> None:
    fleet = nodes(1)
    strategy = CacheAware()
    strategy.choose(fleet, chat(words(4, 80), "q"))
    assert strategy.choose(fleet, chat(words(4, 80), "q")).branch == "cache_hit"
    strategy.forget(fleet[0].url)  # e.g. it restarted: its cache is empty
    assert strategy.choose(fleet, chat(words(4, 80), "q")).branch == "cache_miss"


def test_auto_is_cache_aware_only_when_every_node_reports_prefix_caching() -> None:
    fleet = nodes(2, prefix_caching=True)
    strategy = AutoStrategy(random.Random(0))
    assert strategy.choose(fleet, chat("s", "u")).strategy == "cache_aware"
    fleet[1].prefix_caching = None  # e.g. an LMDeploy node, which exports no vllm:cache_config_info
    assert strategy.choose(fleet, chat("s", "u")).strategy == "min_expected_latency"


# ---- session ---------------------------------------------------------------------------------------


def test_session_ring_is_sticky_and_moves_only_the_sessions_of_a_node_that_leaves() -> None:
    fleet = nodes(3)
    strategy = SessionRing(random.Random(0))

    def place(group: list[Node]) -> dict[str, str]:
        return {key: strategy.choose(group, RoutedRequest("m", PromptPages.text(""), key)).node.url
                for key in (f"session-{i}" for i in range(300))}

    before = place(fleet)
    assert place(fleet) == before
    assert len(set(before.values())) == 3
    after = place(fleet[:2])  # node 2 left
    moved = {key for key in before if before[key] != after[key]}
    assert moved == {key for key, url in before.items() if url == fleet[2].url}
    fleet[0].in_flight = 1
    unkeyed = strategy.choose(fleet, RoutedRequest("m", PromptPages.text(""), None))
    assert unkeyed.branch == "fallback" and unkeyed.node is not fleet[0]


# ---- prompt pages --------------------------------------------------------------------------------------


def test_token_prompts_are_paged_as_the_engine_pages_them() -> None:
    tokens = list(range(100, 153))  # 3 full pages + 5
    pages = PromptPages.of("/v1/completions", {"prompt": tokens})
    assert pages.keys(PAGE) == page_keys(tokens, PAGE) and len(pages.keys(PAGE)) == 3
    batch = PromptPages.of("/v1/completions", {"prompt": [tokens, [1, 2]]})
    assert batch.keys(PAGE) == pages.keys(PAGE), "a batch is routed by its first prompt"


def test_text_prompts_share_leading_pages_exactly_as_long_as_their_text() -> None:
    system = words(5, 60)
    one, two = chat(system, "first question").prompt, chat(system, "second question").prompt
    shared = len(f"system\n{system}\nuser\n") // (PAGE * CHARS_PER_TOKEN)
    assert shared >= 2
    assert one.keys(PAGE)[:shared] == two.keys(PAGE)[:shared]
    other = chat(words(6, 60), "first question").prompt
    assert one.keys(PAGE)[0] != other.keys(PAGE)[0]
    text = PromptPages.of("/v1/completions", {"prompt": "x" * (PAGE * CHARS_PER_TOKEN * (MAX_PAGES + 10))})
    assert len(text.keys(PAGE)) == MAX_PAGES, "hashing work is bounded"


@pytest.mark.parametrize("body", [{"messages": "hi"}, {"messages": [1, None]}, {}, {"prompt": [True, 1]}])
def test_unreadable_prompts_have_no_pages(body: dict) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/chat/interactive"):
        assert PromptPages.of(path, body).keys(PAGE) == []


# ---- the node file ---------------------------------------------------------------------------------------


def test_the_node_file_reads_lmdeploys_shape_and_is_rewritten_whole(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    status = {"role": "Hybrid", "models": ["m"], "unfinished": 0, "latency": [], "speed": 2}
    path.write_text(json.dumps({"http://A:23333/": json.dumps(status)}))  # LMDeploy wrote status as JSON text
    registry = NodeRegistry(str(path))
    registry.restore()
    [node] = list(registry)
    assert (node.url, node.model_names, node.speed, node.healthy) == ("http://a:23333", ["m"], 2, False)
    assert registry.knows("m") and registry.candidates("m") == []
    registry.remove(node.url)
    assert json.loads(path.read_text()) == {}
    assert [p.name for p in tmp_path.iterdir()] == ["nodes.json"], "no temporary file left behind"


@pytest.mark.parametrize("url", ["10.0.0.1:23333", "ftp://a:1", "http://", "http://a:port", "http://a:1/?x=1"])
def test_node_urls_must_be_http_base_urls(url: str) -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        normalize_url(url)


# ---- the app in-process ----------------------------------------------------------------------------------

USER, ADMIN = "user-key", "admin-key"


async def test_every_route_in_the_proxy_url_map_is_guarded_by_the_right_keys(tmp_path: Path) -> None:
    app = create_proxy_app(ProxySettings(api_keys=(USER,), admin_api_keys=(ADMIN,)))
    rules = list(app.url_map.iter_rules())
    paths = {rule.rule for rule in rules}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/models", "/metrics", "/health",
            "/v1/ready", "/openapi.json", "/", "/chat", "/nodes/status", "/nodes/add", "/nodes/remove"} <= paths
    async with app.test_app() as test_app:
        client = test_app.test_client()
        for rule in rules:
            path = re.sub(r"<[^>]+>", "x", rule.rule)
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                def call(key: str | None, scheme: str = "Bearer", path: str = path, method: str = method):
                    headers = {"Authorization": f"{scheme} {key}"} if key else {}
                    return client.open(path, method=method, json={} if method == "POST" else None, headers=headers)

                if rule.rule in ("/health", "/v1/ready") or rule.rule.startswith("/chat"):  # probes, the chat page
                    assert (await call(None)).status_code != 401, path
                    continue
                for refused in (None, "wrong"):
                    answer = await call(refused)
                    assert answer.status_code == 401, (method, path, refused)
                    error = (await answer.get_json())["error"]
                    if path.startswith("/v1/messages"):  # Anthropic's clients read Anthropic's error format
                        assert error["type"] == "authentication_error", error
                    else:
                        assert error["code"] == "invalid_api_key", (path, error)
                assert (await call(USER, "Basic")).status_code == 401
                user, admin = await call(USER), await call(ADMIN, "bearer")
                assert admin.status_code not in (401, 403), (method, path)
                if rule.rule.startswith("/nodes/"):
                    assert user.status_code == 403, (method, path)
                    assert (await user.get_json())["error"]["code"] == "admin_key_required"
                else:
                    assert user.status_code not in (401, 403), (method, path)
        assert (await client.get("/no/such/route")).status_code == 401, "unknown paths say nothing without a key"


async def test_with_no_node_in_rotation_requests_get_503_with_retry_after(tmp_path: Path) -> None:
    node_file = tmp_path / "nodes.json"  # a node that is down: registered, but never in rotation
    node_file.write_text(json.dumps({"http://127.0.0.1:9": {"models": ["m"]}}))
    app = create_proxy_app(ProxySettings(node_file=str(node_file), health_check_interval=60))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        listed = await (await client.get("/v1/models")).get_json()
        assert [card["id"] for card in listed["data"]] == ["m"]
        answer = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert (await answer.get_json())["error"]["code"] == "no_healthy_node"
        unknown = await client.post("/v1/completions", json={"model": "other", "prompt": "x"})
        assert unknown.status_code == 404 and (await unknown.get_json())["error"]["code"] == "model_not_found"
        assert (await client.get("/v1/ready")).status_code == 503
        for body, param in ((b"{not json", None), (b"[1]", None), (b'{"prompt": "x"}', "model")):
            bad = await client.post("/v1/completions", data=body, headers={"Content-Type": "application/json"})
            assert bad.status_code == 400 and (await bad.get_json())["error"]["param"] == param
        unreachable = await client.post("/nodes/add", json={"url": "http://127.0.0.1:9"})
        assert unreachable.status_code == 502 and (await unreachable.get_json())["error"]["code"] == "node_unreachable"
        missing = await client.post("/nodes/remove", json={"url": "http://127.0.0.1:10"})
        assert missing.status_code == 404
        assert (await client.post("/nodes/add", json={"url": "not a url"})).status_code == 400
        removed = await client.post("/nodes/remove", json={"url": "http://127.0.0.1:9/"})
        assert removed.status_code == 200 and json.loads(node_file.read_text()) == {}


async def test_the_proxy_documents_its_routes_in_a_valid_openapi_document_and_serves_the_chat_page() -> None:
    from openapi_spec_validator import validate

    app = create_proxy_app(ProxySettings())
    async with app.test_app() as test_app:
        client = test_app.test_client()
        spec = await (await client.get("/openapi.json")).get_json()
        assert (await client.get("/")).status_code == 200  # Swagger UI
        chat = await client.get("/chat")  # the api_server's chat page, calling the proxy's routes
        assert chat.status_code == 200 and "default-src 'self'" in chat.headers["Content-Security-Policy"]
    validate(spec)
    expected = {"/v1/chat/completions": "post", "/v1/completions": "post", "/v1/chat/interactive": "post",
                "/v1/models": "get", "/health": "get", "/v1/ready": "get", "/metrics": "get",
                "/nodes/status": "get", "/nodes/add": "post", "/nodes/remove": "post"}
    assert {path: set(spec["paths"][path]) for path in expected} == {p: {m} for p, m in expected.items()}
    assert {"ChatCompletionRequest", "CompletionRequest", "NodeRequest", "NodesStatus"} <= set(
        spec["components"]["schemas"])


# ---- flags ---------------------------------------------------------------------------------------


def test_proxy_help_documents_every_flag_with_lmdeploys_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "proxy", "-h"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in PROXY_OPTIONS:
        assert option.flag in text, f"{option.flag} is missing from -h"
    launch = proxy_from_arguments(build_parser().parse_args(["serve", "proxy"]), environ={})
    assert (launch.host, launch.port, launch.settings.routing_strategy) == ("0.0.0.0", 8000, None)


def test_proxy_keys_come_from_the_environment_and_are_never_shown() -> None:
    environ = {"XLSERVE_API_KEYS": "u1,u2", "XLSERVE_ADMIN_API_KEYS": "a1", "XLSERVE_NODE_API_KEY": "n1"}
    launch = proxy_from_arguments(build_parser().parse_args(["serve", "proxy"]), environ=environ)
    assert (launch.settings.api_keys, launch.settings.admin_api_keys) == (("u1", "u2"), ("a1",))
    assert launch.settings.node_api_key == "n1"
    assert not {"u1", "a1", "n1"} & set(re.findall(r"\w+", repr(launch)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--routing-strategy", "round_robin"], "invalid choice"),
        (["--health-check-interval", "0"], "--health-check-interval must be positive"),
        (["--api-keys", "k", "--admin-api-keys", "k"], "--admin-api-keys may not repeat a user key"),
        (["--serving-strategy", "DistServe"], "invalid choice"),
    ],
)
def test_proxy_cli_refuses_clearly(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "proxy", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_api_server_proxy_flags() -> None:
    parser = build_parser()
    launch = from_arguments(parser.parse_args(["serve", "api_server", "--proxy-url", "http://proxy:8000", "--dp",
                                               "2"]), environ={"XLSERVE_PROXY_API_KEY": "secret"})
    assert (launch.proxy_url, launch.proxy_api_key, launch.dp) == ("http://proxy:8000", "secret", 2)
    assert "secret" not in repr(launch)
    for argv, message in ((["--proxy-url", "proxy:8000"], "--proxy-url must be an http"), (["--dp", "0"], "--dp")):
        with pytest.raises(OptionError, match=message):
            from_arguments(parser.parse_args(["serve", "api_server", *argv]), environ={})


# ---- --dp's device plan and the URL a node registers -----------------------------------------------------


def test_replicas_each_see_their_own_devices() -> None:
    gpus = replica_environments("gpu", 8, 2, 4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert gpus == [{"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}]
    assert replica_environments("gpu", 4, 2, 1, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})[1] == {"CUDA_VISIBLE_DEVICES": "5"}
    cpus = replica_environments("cpu", 4, 2, 2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_x=1"})
    assert cpus == [{"XLA_FLAGS": "--xla_x=1 --xla_force_host_platform_device_count=2"}] * 2
    with pytest.raises(ReplicaError, match=r"--dp 3 x --tp 2 needs 6 devices; this host has 4 \(cpu\)"):
        replica_environments("cpu", 4, 3, 2, {})
    with pytest.raises(ReplicaError, match="does not support tpu"):
        replica_environments("tpu", 8, 2, 4, {})


def test_a_node_registers_at_an_address_the_proxy_can_reach() -> None:
    assert advertised_url("0.0.0.0", 23333, "http://127.0.0.1:8000") == "http://127.0.0.1:23333"
    assert advertised_url("10.1.2.3", 23333, "http://proxy:8000") == "http://10.1.2.3:23333"
    assert advertised_url("::1", 23333, "http://[::1]:8000") == "http://[::1]:23333"


def test_the_proxy_does_not_import_the_engine_or_jax() -> None:
    code = ("import sys, serving.proxy.app, serving.proxy.replicas; "
            "print([m for m in sys.modules if m.split('.')[0] in ('jax', 'torch', 'transformers', 'model') "
            "or m.startswith('serving.engine.') and m not in ('serving.engine.page_hash', 'serving.engine.request')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_node_file_that_is_not_one_stops_the_proxy_before_it_serves(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    node_file = tmp_path / "nodes.json"
    node_file.write_text("[not, json")
    with pytest.raises(SystemExit) as exited:
        main(["serve", "proxy", "--node-file", str(node_file)])
    assert exited.value.code == 2
    assert f"cannot read the node file {node_file}" in capsys.readouterr().err
