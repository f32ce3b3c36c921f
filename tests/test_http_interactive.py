"""POST /v1/chat/interactive against live servers: a session's turns prefill only their new tokens and
answer as a full recompute would, busy sessions and full sessions get clear answers, `cancel` stops a
turn, ending a session frees its pages, and nothing is left pinned when the tests are done.

Most tests share the HTTP suite's server; eviction needs a KV cache small enough to fill, so it has a
server of its own (16 pages of 16 tokens, with an API key, which the APIClient test uses as well).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.client import APIClient, APIClientError
from serving.http.errors import APIError
from serving.http.prompts import chat_prompt
from serving.http.protocol import ChatMessage
from serving.http.sessions import Session, SessionRegistry, continuation_ids, turn_tokens
from serving.text.templates import builtin_template
from serving.text.tokenizer import Tokenizer
from tests.family_tokenizers import internlm2_tokenizer, llama3_tokenizer, qwen_tokenizer
from tests.http_fixtures import FEW_BUCKETS, LiveServer, http, scrape, serve_in_thread, shared_http_server  # noqa: F401

ROUTE = "/v1/chat/interactive"
GREEDY = {"temperature": 0, "top_k": 1}
KEY = "interactive-key"


def interact(server: LiveServer, **fields: Any) -> dict[str, Any]:
    response = post(server, **fields)
    assert response.status_code == 200, response.text
    return response.json()


def post(server: LiveServer, **fields: Any) -> httpx.Response:
    return http.post(f"{server.base_url}{ROUTE}", json=fields, timeout=120,
                     headers={"Authorization": f"Bearer {server.api_key}"})  # fmt: skip


def end(server: LiveServer, session_id: int) -> dict[str, Any]:
    return interact(server, prompt="", session_id=session_id, interactive_mode=False, request_output_len=0)


def session(server: LiveServer, session_id: int) -> Session:
    found = server.state.sessions.get(session_id)
    assert found is not None, f"session {session_id} is not kept"
    return found


def assert_no_leak(server: LiveServer) -> None:
    """No session kept, none pinned, no page held once the engine is idle."""
    assert len(server.state.sessions) == 0
    assert server.engine.wait_idle(30)
    deadline = time.monotonic() + 5  # end_session travels through the engine's inbox
    while server.engine.stats().num_pinned_sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = server.engine.stats()
    assert (stats.num_pinned_sessions, stats.num_pages_used) == (0, 0), stats


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind(http_server: LiveServer) -> Iterator[None]:
    yield
    assert_no_leak(http_server)


@pytest.fixture(scope="module")
def small_cache(tiny_llama: Path) -> Iterator[LiveServer]:
    with serve_in_thread(tiny_llama, dict(FEW_BUCKETS, num_pages=17), api_keys=(KEY,)) as (server, _):
        yield server
        assert_no_leak(server)


@pytest.fixture
def slow_steps(http_server: LiveServer) -> Iterator[None]:
    """Every engine step takes 50 ms, so a turn is still running when the test acts on it."""
    http_server.engine.fault_hook = lambda chunks: time.sleep(0.05)
    yield
    http_server.engine.fault_hook = None


# ---- a conversation ------------------------------------------------------------------------------


def test_ten_turns_prefill_only_their_new_tokens_and_answer_as_a_full_recompute(http_server: LiveServer) -> None:
    server, engine, sid = http_server, http_server.engine, 11
    page_size = engine.page_size
    metrics_before = scrape(server)
    total = 0  # tokens in the session after the previous turn
    turns = []
    for k in range(10):
        before = engine.stats()
        # One token a turn: ten Llama 2 turns of 13 tokens just fit the test server's 128.
        answer = interact(server, prompt=f"q{k}", session_id=sid, interactive_mode=True, request_output_len=1,
                          **GREEDY)  # fmt: skip
        after = engine.stats()
        assert answer["history_tokens"] == total
        assert answer["input_tokens"] > 0 and answer["tokens"] == 1
        assert answer["finish_reason"] in ("stop", "length")
        prompt_len = answer["history_tokens"] + answer["input_tokens"]
        computed = after.prompt_tokens_computed - before.prompt_tokens_computed
        reused = after.prefix_cache_hits - before.prefix_cache_hits
        assert computed + reused == prompt_len
        # Only whole pages are cached, and the last sampled token was never run through the model, so
        # at most a page of the history is computed again: the rest came from the session's pages.
        assert answer["input_tokens"] <= computed <= answer["input_tokens"] + page_size
        history = session(server, sid).history
        assert len(history) == prompt_len + answer["tokens"]
        turns.append((history[:prompt_len], answer))
        total = len(history)
    metrics_after = scrape(server)
    computed_total = sum(t[1]["input_tokens"] for t in turns)
    computed_metric = "xlserve:prompt_tokens_computed_total"
    grew = metrics_after[computed_metric] - metrics_before[computed_metric]
    assert computed_total <= grew <= computed_total + 10 * page_size
    assert metrics_after["xlserve:interactive_sessions"] >= 1 and metrics_after["xlserve:pinned_sessions"] >= 1
    # The same prompts from scratch (no cache: /v1/completions with the token ids) give the same answers.
    client = server.client()
    for prompt_ids, answer in turns:
        replay = client.completions.create(model=server.model_name, prompt=prompt_ids, max_tokens=answer["tokens"],
                                           temperature=0, top_p=1, extra_body={"top_k": 1})  # fmt: skip
        assert replay.choices[0].text == answer["text"]
    ended = end(server, sid)
    assert ended == {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": total, "finish_reason": "stop"}
    assert server.state.sessions.get(sid) is None


def test_stream_is_ndjson_with_the_same_answer(http_server: LiveServer) -> None:
    whole = interact(http_server, prompt="Tell me a story", request_output_len=6, **GREEDY)
    assert whole["history_tokens"] == 0 and whole["tokens"] >= 1
    body = {"prompt": "Tell me a story", "request_output_len": 6, "stream": True, **GREEDY}
    with http.stream("POST", f"{http_server.base_url}{ROUTE}", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        raw = response.read().decode()
    assert raw.endswith("\n") and "data:" not in raw
    lines = [json.loads(line) for line in raw.splitlines()]
    assert all(line["finish_reason"] is None for line in lines[:-1])
    assert lines[-1]["finish_reason"] == whole["finish_reason"]
    assert "".join(line["text"] for line in lines) == whole["text"]
    assert lines[-1]["tokens"] == whole["tokens"] and lines[-1]["input_tokens"] == whole["input_tokens"]


def test_the_last_streamed_line_comes_after_the_turn_is_recorded_and_the_session_free(
    http_server: LiveServer,
) -> None:
    """A client may send its next turn the moment it reads a turn's last line: by then the history holds the
    turn and the session is free (the server records both before that line goes out; the console client
    reads the history at once)."""
    body = {"prompt": "Tell me a story", "session_id": 41, "interactive_mode": True, "request_output_len": 6,
            "stream": True, **GREEDY}
    with http.stream("POST", f"{http_server.base_url}{ROUTE}", json=body, timeout=120) as response:
        for raw in response.iter_lines():
            line = json.loads(raw)
            if line["finish_reason"] is not None:  # the stream is still open here
                kept = session(http_server, 41)
                assert len(kept.history) == line["history_tokens"] + line["input_tokens"] + line["tokens"]
                assert kept.turn is None, "the session is still busy with the finished turn"
    end(http_server, 41)


def test_a_message_list_and_a_non_interactive_turn_on_top_of_a_history(http_server: LiveServer) -> None:
    sid = 12
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    first = interact(
        http_server, prompt=messages, session_id=sid, interactive_mode=True, request_output_len=3, **GREEDY
    )
    held = first["input_tokens"] + first["tokens"]
    pinned = http_server.engine.stats().num_pinned_sessions
    assert pinned >= 1
    # interactive_mode false: the turn runs on the history, then the session ends.
    last = interact(http_server, prompt="Bye", session_id=sid, request_output_len=2, **GREEDY)
    assert last["history_tokens"] == held and last["input_tokens"] > 0
    assert http_server.state.sessions.get(sid) is None
    # ... so the next request on the id starts from nothing.
    again = interact(http_server, prompt="Bye", session_id=sid, request_output_len=1, **GREEDY)
    assert again["history_tokens"] == 0


# ---- a turn's tokens: the continuation of the history ------------------------------------------


@pytest.mark.parametrize("name, builder", [
    ("chatml", qwen_tokenizer), ("qwen2_5", qwen_tokenizer), ("qwen3", qwen_tokenizer),
    ("llama3", llama3_tokenizer), ("llama3_1", llama3_tokenizer), ("internlm2", internlm2_tokenizer),
])  # fmt: skip
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_history_and_continuation_are_the_whole_conversation_rendered(
    name: str, builder: Any, system: bool, tmp_path: Path
) -> None:
    """Token for token, for the templates whose end of turn is a special token. (Llama 2 and Mistral
    write a space before `</s>`, which SentencePiece may encode differently at the seam.)"""
    template = builtin_template(name)
    tokenizer = Tokenizer.from_pretrained(str(builder(tmp_path, None)))
    opening = [{"role": "system", "content": "You are terse."}] * system + [{"role": "user", "content": "Hi!"}]
    follow_up = [{"role": "user", "content": "Weather in Paris?"}]
    answer = "Hello, how can I help?"

    def rendered(messages: list[dict]) -> list[int]:
        return chat_prompt(tokenizer, [ChatMessage.model_validate(m) for m in messages], None, template).token_ids

    def continuation(session: Session) -> list[int]:
        return turn_tokens(tokenizer, session, [ChatMessage.model_validate(m) for m in follow_up], template)

    whole = rendered([*opening, {"role": "assistant", "content": answer}, *follow_up])
    first = turn_tokens(tokenizer, Session(1), [ChatMessage.model_validate(m) for m in opening], template)
    assert first == rendered(opening)
    end_of_turn = continuation_ids(tokenizer, [ChatMessage.model_validate(m) for m in follow_up], template)[0]
    assert end_of_turn in tokenizer.all_special_ids
    # What a model answering exactly that generated: the answer's tokens as the whole rendering has them.
    answer_ids = whole[len(first) : whole.index(end_of_turn, len(first))]
    assert tokenizer.decode(answer_ids) == answer
    # The model stopped on its end-of-turn token: the continuation does not write it again.
    stopped = Session(1, history=first + answer_ids + [end_of_turn], ends_on_stop=True)
    assert stopped.history + continuation(stopped) == whole
    # The answer was cut short (a length limit): the continuation closes the turn itself.
    cut = Session(1, history=first + answer_ids)
    assert cut.history + continuation(cut) == whole


# ---- full, busy, cancelled -----------------------------------------------------------------------


def test_a_full_session_answers_length_with_a_message_never_negative_counts(http_server: LiveServer) -> None:
    sid, session_len = 13, http_server.engine.max_session_len
    first = interact(http_server, prompt="Fill the session", session_id=sid, interactive_mode=True,
                     ignore_eos=True, **GREEDY)  # fmt: skip
    assert first["finish_reason"] == "length"
    assert first["input_tokens"] + first["tokens"] == session_len  # request_output_len null: up to the session length
    full = interact(http_server, prompt="More?", session_id=sid, interactive_mode=True, **GREEDY)
    assert (full["text"], full["tokens"], full["finish_reason"]) == ("", 0, "length")
    assert full["history_tokens"] == session_len and full["input_tokens"] > 0
    assert "is full" in full["message"] and '"request_output_len": 0' in full["message"]
    assert len(session(http_server, sid).history) == session_len  # the refused turn left no trace
    assert end(http_server, sid)["history_tokens"] == session_len
    one_off = interact(http_server, prompt="word " * 200)
    assert (one_off["text"], one_off["tokens"], one_off["finish_reason"]) == ("", 0, "length")
    assert one_off["history_tokens"] == 0 and one_off["input_tokens"] > session_len and one_off["message"]


def test_a_busy_session_refuses_a_second_request_and_cancel_stops_the_turn(
    http_server: LiveServer, slow_steps: None
) -> None:
    sid = 14
    first = interact(http_server, prompt="Hello", session_id=sid, interactive_mode=True, request_output_len=2)
    history = list(session(http_server, sid).history)
    answers: list[dict[str, Any]] = []
    running = threading.Thread(
        target=lambda: answers.append(
            interact(
                http_server,
                prompt="Go on",
                session_id=sid,
                interactive_mode=True,
                request_output_len=60,
                ignore_eos=True,
            )
        )
    )
    running.start()
    deadline = time.monotonic() + 30
    while not session(http_server, sid).busy:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # generating by now
    busy = post(http_server, prompt="Me too", session_id=sid, interactive_mode=True)
    assert busy.status_code == 400
    assert busy.json()["error"] | {"message": None} == {
        "message": None,
        "type": "invalid_request_error",
        "param": "session_id",
        "code": "session_busy",
    }
    assert "busy" in busy.json()["error"]["message"]
    cancelled = interact(http_server, prompt="", session_id=sid, cancel=True)
    assert cancelled == {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": len(history),
                         "finish_reason": "stop"}  # fmt: skip
    running.join(30)
    [cut] = answers
    assert cut["finish_reason"] == "abort" and 0 < cut["tokens"] < 60
    assert session(http_server, sid).history == history and not session(http_server, sid).busy
    after = interact(http_server, prompt="Again", session_id=sid, interactive_mode=True, request_output_len=1)
    assert after["history_tokens"] == first["input_tokens"] + first["tokens"]
    end(http_server, sid)


def test_bad_requests_get_openai_errors(http_server: LiveServer) -> None:
    cases = [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "session_id": "one"}, "session_id"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "session_id": -2}, "session_id"),
        ({"prompt": "hi", "request_output_len": -1}, "request_output_len"),
        ({"prompt": [{"role": "robot", "content": "hi"}]}, "prompt[0].role"),
        ({"prompt": "hi", "adapter_name": "lora-1"}, "adapter_name"),
        ({"prompt": "hi", "image_url": "http://x/cat.png"}, "image_url"),
        ({"prompt": "", "cancel": True}, "session_id"),
        ({"session_id": 1}, "prompt"),
    ]
    for body, param in cases:
        response = post(http_server, **body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
        assert error["message"]
    assert "LoRA" in post(http_server, prompt="hi", adapter_name="x").json()["error"]["message"]
    assert http.post(f"{http_server.base_url}{ROUTE}", content=b"{").status_code == 400


def test_the_route_is_documented(http_server: LiveServer) -> None:
    spec = http.get(f"{http_server.base_url}/openapi.json").json()
    operation = spec["paths"][ROUTE]["post"]
    assert {"application/json", "application/x-ndjson"} <= set(operation["responses"]["200"]["content"])
    assert "InteractiveRequest" in spec["components"]["schemas"]


def test_the_registry_ends_the_least_recently_used_idle_session_and_says_so_once() -> None:
    ended: list[str] = []
    registry = SessionRegistry(ended.append, max_sessions=2)
    for session_id in (1, 2):
        found, turn = registry.begin(session_id)
        found.history = [1, 2, 3]
        registry.finish(found, turn)
    busy, running = registry.begin(1)  # 1 is now the most recently used, and busy
    with pytest.raises(APIError) as refused:
        registry.begin(1)
    assert (refused.value.status, refused.value.code) == (400, "session_busy")
    registry.begin(3)  # full: 2, the least recently used idle session, makes room
    assert ended == ["2"] and registry.get(2) is None and len(registry) == 2
    with pytest.raises(APIError) as expired:
        registry.begin(2)
    assert (expired.value.status, expired.value.code) == (400, "session_expired")
    registry.finish(busy, running)
    registry.begin(2)  # told once; now a new session (ending 1, idle again and least recently used)
    assert ended == ["2", "1"]
    with pytest.raises(APIError) as full:
        registry.begin(4)  # 3 and 2 are both running a turn
    assert (full.value.status, full.value.code) == (503, "too_many_sessions")


# ---- eviction, on a server with a small cache ----------------------------------------------------


def test_an_evicted_session_recomputes_its_pages_and_answers_the_same(small_cache: LiveServer) -> None:
    server, engine = small_cache, small_cache.engine
    opening = "Once upon a time in a land far away there lived " * 3

    def two_turns(sid: int, evict: bool) -> list[dict[str, Any]]:
        answers = [interact(server, prompt=opening, session_id=sid, interactive_mode=True, request_output_len=4,
                            **GREEDY)]  # fmt: skip
        if evict:
            fill_the_cache(server)
            assert engine.stats().num_pinned_sessions == 0  # the idle session gave its pages up
        before = engine.stats().prompt_tokens_computed
        answers.append(interact(server, prompt="And then?", session_id=sid, interactive_mode=True,
                                request_output_len=4, **GREEDY))  # fmt: skip
        computed = engine.stats().prompt_tokens_computed - before
        last = answers[-1]
        if evict:  # everything again, nothing lost from the history
            assert computed == last["history_tokens"] + last["input_tokens"]
        else:
            assert computed <= last["input_tokens"] + engine.page_size
        end(server, sid)
        return answers

    reference = two_turns(21, evict=False)
    evicted = two_turns(22, evict=True)
    assert [a["text"] for a in evicted] == [a["text"] for a in reference]
    assert [a["history_tokens"] for a in evicted] == [a["history_tokens"] for a in reference]
    assert reference[1]["text"] and reference[1]["tokens"] > 0


def fill_the_cache(server: LiveServer) -> None:
    """Four requests of 7 pages each at once: nearly twice the cache."""
    client = server.client()

    def long_request(i: int) -> str | None:
        completion = client.completions.create(model=server.model_name, prompt=f"{i} " + "filler text " * 30,
                                              max_tokens=20, extra_body={"ignore_eos": True})  # fmt: skip
        return completion.choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(long_request, range(4))) == ["length"] * 4
    assert server.engine.wait_idle(30)


def test_the_api_client_sends_its_key(small_cache: LiveServer) -> None:
    with APIClient(small_cache.base_url, api_key=KEY) as client:
        assert client.available_models == [small_cache.model_name]
        [answer] = client.chat_interactive_v1("hi", session_id=3, interactive_mode=True, request_output_len=2)
        assert answer["tokens"] >= 1
        assert client.end_session(3)["history_tokens"] == answer["input_tokens"] + answer["tokens"]
    with APIClient(small_cache.base_url) as keyless:
        [refused] = keyless.chat_interactive_v1("hi")
        assert refused["error"]["code"] == "invalid_api_key"
        assert keyless.available_models is None
    with APIClient(small_cache.base_url, raise_errors=True) as keyless, pytest.raises(APIClientError) as raised:
        list(keyless.chat_interactive_v1("hi"))
    assert raised.value.status == 401 and raised.value.code == "invalid_api_key"
