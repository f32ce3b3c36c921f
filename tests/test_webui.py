"""The chat page (/chat) and Swagger UI in a real browser: Debian's Chromium, headless, driven by
Playwright, against one live server behind an API key.

The server's model is scripted (`make_scripted_checkpoint`): whatever it is asked, it answers with a
`<script>` element, an `<img onerror>` element, then " again" until its token budget ends, so a test
knows the exact reply, the page must show markup as text, and a reply is as long as the test wants.
Every engine step is slowed a little (the engine's test-only `fault_hook`) so a reply takes long
enough to watch it grow and to stop it. Every request the browser makes to anything but this server
is refused and recorded, so a page that needed the internet would fail here (the refusal runs in this
process, so tests wait with `page.wait_for_timeout`, never `time.sleep`, while the page makes requests).
Each test leaves a screenshot of its page in its pytest tmp dir.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
from quart import Quart

from serving.cli import build_parser
from serving.http.options import from_arguments
from serving.http.swagger import install_swagger_ui
from serving.http.webui import CONTENT_SECURITY_POLICY, install_webui
from serving.http.webui_remote import create_webui_app
from tests.checkpoints import make_scripted_checkpoint
from tests.http_fixtures import (
    FEW_BUCKETS,
    LiveServer,
    ServerProcess,
    console_script,
    free_port,
    http,
    scrape,
    serve_in_thread,
)

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser downloads cannot work offline
# Without the background-networking flags Chromium keeps trying to reach Google's services.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-webui"
SCRIPT = ("<script>window.xss = 1</script>", '<img src="x" onerror="window.xss = 2">')
LOOP_WORD = " again"
# A session of 1024 tokens, so LMDeploy's default of 512 new tokens fits beside a prompt.
ENGINE_OPTIONS = dict(FEW_BUCKETS, session_len=1024)
STEP_DELAY_S = 0.02
STOP_DEADLINE_S = 1.0  # Stop must free the request's slot and pages on the server within this
WAIT_MS = 30_000


def expected_reply(tokens: int) -> str:
    return "".join(SCRIPT) + LOOP_WORD * (tokens - len(SCRIPT))


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory: pytest.TempPathFactory, sentencepiece_dir: Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(sentencepiece_dir), local_files_only=True)
    tokenizer.add_tokens(list(SCRIPT))  # one token each, so the script is short
    script = [*tokenizer.convert_tokens_to_ids(list(SCRIPT)), *tokenizer.encode(LOOP_WORD, add_special_tokens=False)]
    assert len(script) == len(SCRIPT) + 1, "the loop word must be one token"
    directory = make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"), script, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(scripted_model: Path) -> Iterator[LiveServer]:
    with serve_in_thread(scripted_model, ENGINE_OPTIONS, api_keys=(KEY,)) as (live, _):
        live.engine.fault_hook = lambda chunks: time.sleep(STEP_DELAY_S)
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@dataclass
class Tab:
    page: Page
    allowed: list[str]  # origins the page may reach (the server's; a test may add one)
    artifacts: Path  # the test's tmp dir, for screenshots
    blocked: list[str] = field(default_factory=list)  # requests to anything else
    console_errors: list[str] = field(default_factory=list)

    def screenshot(self, name: str) -> None:
        self.page.screenshot(path=self.artifacts / f"{name}.png", full_page=True)


@pytest.fixture
def tab(browser: Browser, server: LiveServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    opened = Tab(page, allowed=[server.base_url], artifacts=tmp_path)

    def only_the_server(route: Route) -> None:
        if any(route.request.url.startswith(f"{origin}/") for origin in opened.allowed):
            route.continue_()
        else:
            opened.blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    page.on("console", lambda message: message.type == "error" and opened.console_errors.append(message.text))
    page.on("pageerror", lambda error: opened.console_errors.append(str(error)))
    try:
        yield opened
    finally:
        opened.screenshot(request.node.name)  # the page as the test left it
        context.close()
    assert not opened.blocked, f"the page reached outside the server: {opened.blocked}"
    assert not [e for e in opened.console_errors if "Content Security Policy" in e], opened.console_errors


def open_chat(page: Page, server: LiveServer, key: str = KEY, base_url: str | None = None) -> None:
    """Open the page in a tab where the key was typed before (the page keeps it in sessionStorage)."""
    page.add_init_script(f"sessionStorage.setItem('xlserve-api-key', {key!r})")
    page.goto(f"{base_url or server.base_url}/chat")


def type_key(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")


def set_slider(page: Page, slider: str, value: float) -> None:
    page.eval_on_selector(f"#{slider}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(value))


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def last_reply(page: Page) -> str:
    return page.locator(".message.assistant .content").last.text_content() or ""


def metric(server: LiveServer, name: str) -> float:
    return scrape(server)[name]


# ---- the page as served ------------------------------------------------------------------------


def test_page_is_self_contained_and_open_without_a_key(server: LiveServer) -> None:
    page = http.get(f"{server.base_url}/chat")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "the page loads something from elsewhere"
    for asset in ("chat/chat.js", "chat/chat.css"):
        assert asset in page.text
        assert http.get(f"{server.base_url}/{asset}").status_code == 200
    # The API the page calls needs the key like any other client's call.
    assert http.get(f"{server.base_url}/v1/models").status_code == 401


async def test_chat_at_root_redirects_and_swagger_moves_to_docs() -> None:
    app = Quart("routes-only")  # the routes alone: install_webui is what any app (the proxy too) calls
    opened = install_webui(app, redirect_root=True)
    install_swagger_ui(app, "/docs")
    assert opened == {"/", "/chat", "/chat/chat.js", "/chat/chat.css"}
    client = app.test_client()
    root = await client.get("/")
    assert root.status_code == 302 and root.headers["Location"].endswith("/chat")
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in (await docs.get_data(as_text=True))


async def test_webui_for_an_unreachable_server_answers_502() -> None:
    app = create_webui_app(f"127.0.0.1:{free_port()}")  # nothing listens there
    async with app.test_app() as running:
        answer = await running.test_client().get("/v1/models")
        assert answer.status_code == 502
        error = (await answer.get_json())["error"]
        assert error["code"] == "upstream_unreachable" and "cannot reach the API server" in error["message"]


def test_no_webui_and_chat_at_root_flags() -> None:
    def settings(*flags: str):  # noqa: ANN202
        return from_arguments(build_parser().parse_args(["serve", "api_server", *flags]), environ={}).settings

    assert (settings().webui, settings().chat_at_root) == (True, False)
    assert settings("--no-webui").webui is False
    assert settings("--chat-at-root").chat_at_root is True


# ---- the chat page in the browser ---------------------------------------------------------------


def test_reply_streams_in_and_markup_stays_text(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    open_chat(page, server)
    expect(page.locator("#model option")).to_have_text([server.model_name])
    # LMDeploy's gradio defaults
    assert [page.input_value(f"#{s}") for s in ("max-tokens", "temperature", "top-p")] == ["512", "0.7", "0.8"]
    set_slider(page, "max-tokens", 40)
    send(page, "Show me <b>bold</b> & <i>markup</i>")
    snapshots: list[str] = []
    deadline = time.monotonic() + WAIT_MS / 1000
    while page.is_enabled("#stop") or not snapshots:
        assert time.monotonic() < deadline, "the reply never finished"
        text = last_reply(page) if page.locator(".message.assistant").count() else ""
        if text and (not snapshots or text != snapshots[-1]):
            snapshots.append(text)
        page.wait_for_timeout(20)
    expect(page.locator("#stop")).to_be_disabled()
    final = last_reply(page)
    assert final == expected_reply(40)
    growing = [s for s in snapshots if s != final]
    assert len(growing) >= 2, f"the reply appeared in {len(snapshots)} snapshot(s), not as a stream"
    assert all(final.startswith(s) for s in snapshots)
    # Markup from the model and from the user is shown as text: no element made, no script run.
    conversation = page.locator("#conversation")
    assert conversation.locator("script, img, b, i").count() == 0
    assert page.evaluate("window.xss") is None
    expect(page.locator(".message.user .content")).to_have_text("Show me <b>bold</b> & <i>markup</i>")
    expect(page.locator("#status")).to_contain_text("40 tokens (length)")
    assert not tab.console_errors


def stop_frees_the_server(page: Page, server: LiveServer) -> None:
    """Send a long request from the open page, Stop it, and check the server frees it within the deadline."""
    expect(page.locator("#model option")).to_have_count(1)
    usage_before = metric(server, "vllm:kv_cache_usage_perc")
    set_slider(page, "max-tokens", 512)
    send(page, "Write for a long time")  # 512 new tokens at STEP_DELAY_S or more a token: over 10 s
    expect(page.locator(".message.assistant .content").last).to_contain_text("again", timeout=WAIT_MS)
    assert metric(server, "vllm:num_requests_running") == 1
    assert metric(server, "vllm:kv_cache_usage_perc") > usage_before
    page.click("#stop")
    stopped = time.monotonic()
    # Back to no request running and no more pages in use than before (fewer once a session is ended).
    while metric(server, "vllm:num_requests_running") or metric(server, "vllm:kv_cache_usage_perc") > usage_before:
        assert time.monotonic() - stopped < STOP_DEADLINE_S, "Stop did not free the request on the server"
        page.wait_for_timeout(20)
    expect(page.locator(".message.assistant").last).to_have_class(re.compile("stopped"))
    expect(page.locator("#status")).to_have_text("stopped")
    expect(page.locator("#send")).to_be_enabled()
    assert len(last_reply(page)) < len(expected_reply(512))


def test_stop_aborts_the_request_on_the_server(tab: Tab, server: LiveServer) -> None:
    open_chat(tab.page, server)
    stop_frees_the_server(tab.page, server)
    assert not tab.console_errors


def test_serve_gradio_serves_the_page_for_a_remote_server(tab: Tab, server: LiveServer) -> None:
    port = free_port()
    webui = ServerProcess([console_script("xlserve"), "serve", "gradio", server.base_url.removeprefix("http://"),
                           "--server-name", "127.0.0.1", "--server-port", str(port)])
    base_url = f"http://127.0.0.1:{port}"
    try:
        webui.wait_until(lambda: http.get(f"{base_url}/chat").status_code == 200)
        assert http.get(base_url).headers["location"].endswith("/chat")
        tab.allowed.append(base_url)
        page = tab.page
        open_chat(page, server, base_url=base_url)
        expect(page.locator("#model option")).to_have_text([server.model_name])
        set_slider(page, "max-tokens", 5)
        send(page, "hello from afar")
        expect(page.locator("#status")).to_have_text("5 tokens (length)", timeout=WAIT_MS)
        assert last_reply(page) == expected_reply(5)
        stop_frees_the_server(page, server)  # Stop reaches the API server through the forwarding
    finally:
        assert webui.stop() == 0, webui.output()
    assert not tab.console_errors


def test_a_bad_key_shows_the_servers_message(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    page.goto(f"{server.base_url}/chat")
    message = "Incorrect or missing API key"
    expect(page.locator("#error")).to_contain_text(message)  # no key yet: the model list is refused
    type_key(page, "sk-wrong")
    send(page, "hello")
    expect(page.locator("#error")).to_have_text(re.compile(f"^{message}"))
    expect(page.locator(".message.assistant")).to_have_count(0)  # no empty reply left behind
    expect(page.locator("#regenerate")).to_be_enabled()  # the message can be sent again
    tab.screenshot("bad-key")
    # The key is kept for the tab: a reload still has it, and the right one then works.
    page.reload()
    expect(page.locator("#api-key")).to_have_value("sk-wrong")
    type_key(page, KEY)
    expect(page.locator("#model option")).to_have_text([server.model_name])
    expect(page.locator("#error")).to_be_hidden()


def test_interactive_mode_keeps_the_history_on_the_server(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    open_chat(page, server)
    expect(page.locator("#model option")).to_have_count(1)
    page.check("#interactive")
    page.fill("#system", "You repeat yourself.")
    set_slider(page, "max-tokens", 6)
    history = re.compile(r"session (\d+): (\d+) tokens of history before this turn, (\d+) new")
    turns = []
    for text in ("first turn", "second turn"):
        send(page, text)
        expect(page.locator("#status")).to_contain_text("(length)", timeout=WAIT_MS)
        turns.append([int(n) for n in history.search(page.text_content("#status")).groups()])
    (session_id, first_history, _), (same_id, second_history, new_tokens) = turns
    assert session_id == same_id and first_history == 0 and second_history > 0 and new_tokens == 6
    session = server.state.sessions.get(session_id)
    assert session is not None and len(session.history) > second_history
    assert last_reply(page) == expected_reply(6)
    tab.screenshot("second-turn")
    page.click("#reset")  # ends the session on the server
    deadline = time.monotonic() + 10
    while server.state.sessions.get(session_id) is not None:
        assert time.monotonic() < deadline, f"Reset did not end the session: {page.text_content('#error')}"
        page.wait_for_timeout(50)
    expect(page.locator(".message")).to_have_count(0)
    assert not tab.console_errors


def test_stop_in_an_interactive_session_replays_the_conversation_into_a_new_one(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    open_chat(page, server)
    expect(page.locator("#model option")).to_have_count(1)
    page.check("#interactive")
    set_slider(page, "max-tokens", 3)
    send(page, "first question")
    expect(page.locator("#status")).to_contain_text("(length)", timeout=WAIT_MS)
    first_session = page.evaluate("chat.sessionId")
    assert server.state.sessions.get(first_session) is not None
    stop_frees_the_server(page, server)  # a stopped turn leaves no history on the server ...
    deadline = time.monotonic() + 10
    while server.state.sessions.get(first_session) is not None:  # ... so the page ends that session
        assert time.monotonic() < deadline, f"the stopped session was not ended: {page.text_content('#error')}"
        page.wait_for_timeout(50)
    set_slider(page, "max-tokens", 3)
    send(page, "after the stop")
    expect(page.locator("#status")).to_contain_text("(length)", timeout=WAIT_MS)
    second_session = page.evaluate("chat.sessionId")
    assert second_session != first_session
    # The new session got the whole conversation, the stopped part of the reply included.
    history = server.engine.tokenizer.decode(server.state.sessions.get(second_session).history)
    assert all(text in history for text in ("first question", "Write for a long time", "again", "after the stop"))
    page.click("#reset")
    expect(page.locator(".message")).to_have_count(0)
    assert not tab.console_errors


def test_regenerate_replaces_the_last_reply(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    open_chat(page, server)
    expect(page.locator("#model option")).to_have_count(1)
    set_slider(page, "max-tokens", 4)
    send(page, "once")
    expect(page.locator("#status")).to_contain_text("(length)", timeout=WAIT_MS)
    set_slider(page, "max-tokens", 5)
    page.click("#regenerate")
    expect(page.locator("#status")).to_contain_text("5 tokens (length)", timeout=WAIT_MS)
    expect(page.locator(".message.assistant .content")).to_have_text([expected_reply(5)])
    expect(page.locator(".message.user")).to_have_count(1)


# ---- Swagger UI ---------------------------------------------------------------------------------


def test_swagger_ui_renders_offline(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    # A browser cannot send a key when it opens a page; this one is set to, as the key-guarded / needs.
    page.context.set_extra_http_headers({"Authorization": f"Bearer {KEY}"})
    page.goto(f"{server.base_url}/")
    paths = page.locator(".opblock-summary-path")
    expect(paths.first).to_be_visible(timeout=WAIT_MS)
    shown = set(paths.all_text_contents())
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/chat/interactive"} <= {
        path.replace("\u200b", "") for path in shown
    }
    page.locator(".opblock-summary", has_text="/v1/chat/completions").click()  # an operation opens
    expect(page.locator(".try-out__btn")).to_be_visible()
    expect(page.locator(".opblock-body")).to_contain_text("Request body")
    assert not tab.console_errors
