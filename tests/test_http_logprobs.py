"""Log probabilities, echo, penalties, logit bias and min_tokens through the OpenAI API, against transformers.

One shared server (the tiny f32 Llama); every reference is computed from transformers' logits of the same
checkpoint with the same formulas written in NumPy.
"""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from serving.text.bad_words import bad_word_spellings
from tests.http_fixtures import http, shared_http_server  # noqa: F401 (the `http_server` fixture)

PROMPT = [1, 450, 1996, 1354, 701, 1916, 432, 1204, 975]  # token ids (the prompt is given as ids)
TOL = 1e-4


def hf_logprobs(hf_tiny, ids: list[int]) -> np.ndarray:
    """log_softmax of transformers' logits at every position of `ids`: f64[len(ids), V]."""
    with torch.no_grad():
        logits = hf_tiny(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def hf_logits(hf_tiny, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_tiny(torch.tensor([ids])).logits[0, -1].double().numpy()


def test_completion_echo_logprobs_equal_transformers_at_prompt_and_output(http_server, hf_tiny):
    client = http_server.client()
    answer = client.completions.create(model=http_server.model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                                       echo=True, logprobs=5, extra_body={"ignore_eos": True})
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(PROMPT) + 4
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    tokenizer = http_server.engine.tokenizer
    ids = PROMPT + reference_greedy(hf_tiny, PROMPT, 4)
    assert logprobs.tokens == [tokenizer.token_piece(i)[0] for i in ids]
    want = hf_logprobs(hf_tiny, ids)
    for position in range(1, len(ids)):
        got = logprobs.token_logprobs[position]
        assert abs(got - want[position - 1, ids[position]]) < TOL, position
        top = torch.topk(torch.tensor(want[position - 1]), 5).indices.tolist()
        got_top = logprobs.top_logprobs[position]  # a JSON object: its order is not kept
        assert set(got_top) == {tokenizer.token_piece(i)[0] for i in top}, position
        for i in top:
            assert abs(got_top[tokenizer.token_piece(i)[0]] - want[position - 1, i]) < TOL, position
    # Offsets index the returned text, and the tokens' texts make it up.
    text = answer.choices[0].text
    assert logprobs.text_offset[0] == 0 and sorted(logprobs.text_offset) == logprobs.text_offset
    assert logprobs.text_offset[-1] <= len(text)


def test_chat_top_logprobs_ids_equal_torch_topk(http_server, hf_tiny):
    client = http_server.client()
    answer = client.chat.completions.create(model=http_server.model_name, max_tokens=3, temperature=0,
                                            messages=[{"role": "user", "content": "Hello there"}],
                                            logprobs=True, top_logprobs=20)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    prompt_ids = _chat_prompt_ids(http_server, "Hello there")
    tokenizer = http_server.engine.tokenizer
    ids = list(prompt_ids)
    for entry in content:
        want = hf_logprobs(hf_tiny, ids)[-1]
        top = torch.topk(torch.tensor(want), 20).indices.tolist()
        assert [t.token for t in entry.top_logprobs] == [tokenizer.token_piece(i)[0] for i in top]
        assert bytes(entry.bytes) == tokenizer.token_piece(top[0])[1]
        assert abs(entry.logprob - want[top[0]]) < TOL  # greedy: the chosen token is the top one
        ids.append(top[0])


def _chat_prompt_ids(server, text: str) -> list[int]:
    tokenizer = server.engine.tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return rendered if isinstance(rendered, list) else tokenizer.encode(rendered, add_special_tokens=False)


def test_stream_equals_non_stream_field_by_field(http_server):
    client = http_server.client()
    common = dict(model=http_server.model_name, max_tokens=8, temperature=0.9, seed=7,
                  messages=[{"role": "user", "content": "Tell me"}], logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**common).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(**common, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                assert choice.logprobs.content, "a chunk with logprobs carries its tokens'"
                streamed += choice.logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]
    # Completions likewise, echo included.
    common = dict(model=http_server.model_name, prompt=PROMPT, max_tokens=6, temperature=0.9, seed=3, logprobs=2,
                  echo=True)
    whole = client.completions.create(**common).choices[0]
    text, fields = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**common, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                for name in fields:
                    fields[name] += getattr(choice.logprobs, name)
    assert text == whole.text
    assert fields == {name: getattr(whole.logprobs, name) for name in fields}


def test_loglikelihood_request_ranks_continuations_as_transformers(http_server, hf_tiny):
    # lm-eval's local-completions: echo, logprobs 1, max_tokens 0; the continuation's token logprobs summed.
    context = PROMPT[:5]
    continuations = [[1916, 432], [1204, 975, 450], [701], [1996, 1996]]
    client = http_server.client()
    answer = client.completions.create(model=http_server.model_name, prompt=[context + c for c in continuations],
                                       max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [c.finish_reason for c in answer.choices] == ["length"] * 4 and answer.usage.completion_tokens == 0
    ours, theirs = [], []
    for choice, continuation in zip(answer.choices, continuations, strict=True):
        assert len(choice.logprobs.token_logprobs) == len(context) + len(continuation)
        ours.append(sum(choice.logprobs.token_logprobs[len(context):]))
        ids = context + continuation
        want = hf_logprobs(hf_tiny, ids)
        theirs.append(sum(want[i - 1, ids[i]] for i in range(len(context), len(ids))))
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert np.argsort(ours).tolist() == np.argsort(theirs).tolist()


def reference_greedy(hf_tiny, prompt: list[int], steps: int, presence: float = 0.0, frequency: float = 0.0,
                     bias: dict[int, float] | None = None, min_tokens: int = 0, stop_ids: frozenset[int] = frozenset(),
                     ) -> list[int]:
    """Greedy decoding with OpenAI's penalties, logit bias and min_tokens, written in NumPy over transformers'
    logits: x - frequency * count - presence * (count > 0) + bias; stop ids -inf below min_tokens."""
    out: list[int] = []
    for _ in range(steps):
        x = hf_logits(hf_tiny, prompt + out).astype(np.float32)
        counts = np.bincount(np.array(out, dtype=np.int64), minlength=x.size).astype(np.float32)
        x = x - np.float32(frequency) * counts - np.float32(presence) * (counts > 0)
        for token, value in (bias or {}).items():
            x[token] += np.float32(value)
        if len(out) < min_tokens:
            x[list(stop_ids)] = -np.inf
        out.append(int(np.argmax(x)))
        if out[-1] in stop_ids:
            break
    return out


def test_penalties_logit_bias_and_min_tokens_match_a_numpy_reference(http_server, hf_tiny):
    client = http_server.client()
    tokenizer = http_server.engine.tokenizer
    plain = reference_greedy(hf_tiny, PROMPT, 10)
    cases = [
        dict(presence_penalty=1.5, frequency_penalty=0.0),
        dict(presence_penalty=0.0, frequency_penalty=2.0),
        dict(presence_penalty=-0.5, frequency_penalty=1.0, logit_bias={str(plain[0]): -100, "1916": 3.5}),
    ]
    for case in cases:
        bias = {int(k): v for k, v in case.get("logit_bias", {}).items()}
        want = reference_greedy(hf_tiny, PROMPT, 10, case["presence_penalty"], case["frequency_penalty"], bias)
        answer = client.completions.create(model=http_server.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                           logprobs=0, extra_body={"ignore_eos": True}, **case)
        assert answer.choices[0].logprobs.tokens == _pieces(tokenizer, want), case
    assert want != plain  # the options did change the output
    # min_tokens: EOS biased to the top still waits for 3 tokens.
    eos = sorted(http_server.engine.eos_token_ids)[0]
    want = reference_greedy(hf_tiny, PROMPT, 10, bias={eos: 100.0}, min_tokens=3,
                            stop_ids=frozenset(http_server.engine.eos_token_ids))
    answer = client.completions.create(model=http_server.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                       logprobs=0, logit_bias={str(eos): 100}, extra_body={"min_tokens": 3})
    assert answer.choices[0].logprobs.tokens == _pieces(tokenizer, want) and len(want) == 4 and want[-1] == eos


def test_bad_words_of_several_tokens_are_never_completed(http_server, hf_tiny):
    """A word the greedy answer spells with two tokens, banned: the answer turns away at its last token
    exactly where a NumPy reference that bans completing it does (vLLM's rule), on the device path."""
    tokenizer = http_server.engine.tokenizer
    plain = reference_greedy(hf_tiny, PROMPT, 12)
    for at in range(len(plain) - 1):
        word = tokenizer.decode(plain[at:at + 2]).strip()
        single, several = bad_word_spellings(tokenizer, [word])
        if word and tuple(plain[at:at + 2]) in several:
            break
    else:
        raise AssertionError(f"no two-token word in {plain}")
    out: list[int] = []
    for _ in range(12):
        x = hf_logits(hf_tiny, PROMPT + out)
        x[single] = -np.inf
        for spelled in several:
            if len(spelled) - 1 <= len(out) and tuple(out[len(out) - len(spelled) + 1:]) == spelled[:-1]:
                x[spelled[-1]] = -np.inf
        out.append(int(np.argmax(x)))
    assert out != plain
    answer = http_server.client().completions.create(model=http_server.model_name, prompt=PROMPT, max_tokens=12,
                                                     temperature=0, logprobs=0,
                                                     extra_body={"ignore_eos": True, "bad_words": [word]})
    assert answer.choices[0].logprobs.tokens == _pieces(tokenizer, out)


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.token_piece(i)[0] for i in ids]


def test_best_of_returns_the_n_of_highest_cumulative_logprob(http_server):
    client = http_server.client()
    common = dict(model=http_server.model_name, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=11, logprobs=0)
    every = client.completions.create(**common, n=4).choices
    best = client.completions.create(**common, n=2, best_of=4).choices
    ranked = sorted(every, key=lambda c: -sum(c.logprobs.token_logprobs))[:2]
    assert sorted(c.text for c in best) == sorted(c.text for c in ranked)


@pytest.mark.parametrize(("route", "body", "param"), [
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("completions", {"best_of": 1, "n": 2}, "best_of"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"bad_words": [""]}, "bad_words"),
])
def test_bad_input_is_a_400_in_the_openai_format(http_server, route, body, param):
    base = {"model": http_server.model_name, "max_tokens": 2}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if route.startswith("chat") else {"prompt": "hi"}
    response = http.post(f"{http_server.base_url}/v1/{route}", json=base | body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "") + error["message"]


def test_openai_sdk_accepts_the_answers(http_server):
    client = http_server.client()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=http_server.model_name, prompt="hi", max_tokens=2, best_of=2, stream=True)


def test_log_probabilities_leave_the_device_only_for_steps_whose_rows_ask(http_server, monkeypatch):
    """A step returns log probabilities (which the engine then copies to the host) only when a row of it
    asked for them: plain rows and rows with penalties only (which run the extended sampler) return the
    sampled tokens alone, and no request compiles anything."""
    runner = http_server.engine.runner
    run, run_extended = runner.run, runner._run_extended
    steps: list[tuple[bool, bool]] = []  # (the step ran the extended sampler, it returned log probabilities)
    extended: list[bool] = []

    def recorded(*args, **kwargs):
        extended.clear()
        output = run(*args, **kwargs)
        steps.append((bool(extended), output.logprobs is not None))
        return output

    def recorded_extended(*args, **kwargs):
        extended.append(True)
        return run_extended(*args, **kwargs)

    monkeypatch.setattr(runner, "run", recorded)
    monkeypatch.setattr(runner, "_run_extended", recorded_extended)
    client = http_server.client()

    def ask(**fields) -> list[tuple[bool, bool]]:
        steps.clear()
        client.completions.create(model=http_server.model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True}, **fields)
        return list(steps)

    assert ask() and all(step == (False, False) for step in ask())
    assert all(step == (True, False) for step in ask(presence_penalty=1.5, frequency_penalty=0.5))
    with_logprobs = ask(logprobs=2)
    assert sum(step == (True, True) for step in with_logprobs) >= 5, with_logprobs
    assert http_server.engine.stats().compilations_after_warmup == 0
