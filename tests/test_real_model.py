"""The real-model tier: a trained model (SmolLM2-135M-Instruct, Q4_1 GGUF) served end to end.

Every other test model has random weights, so nothing else can see whether a served model answers: here
one `xlserve serve api_server FILE.gguf` process is asked, through the HTTP API and the openai SDK, for
what only a trained model shows: a factual answer, a turn its chat template ends (the model writes
`<|im_end|>`, which stops it), a stop string that cuts a known answer where it says, and a streamed
answer equal to the same answer in one piece. Greedy tokens must equal transformers' `generate` on the
same file's dequantized weights in float32, and so must the logits of one prefill. The server runs
`--dtype float32`, which keeps the file's own Q4_1 blocks (the native kernel multiplies them in float32):
their logits must be the float32 weights' up to the order of sums. With bfloat16 weights (`--weight-quant
bf16`) the model must still answer, its logits near float32's. The file is fetched once into `.models/`
(tests/real_model.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from serving.text.tokenizer import Tokenizer
from tests.gguf_files import our_logits, transformers_logits
from tests.http_fixtures import ServerProcess, console_script, free_port, openai_client
from tests.real_model import smollm2_gguf

pytestmark = pytest.mark.slow  # a 93 MB download on a fresh checkout, and a 30-layer model to compile

MODEL_NAME = "smollm2"
# One prefill row of 64 tokens (the prompts are 30-50 tokens) and decode batches of 1 and 4: few programs
# to compile; the session is the model's own 8192 tokens, as a user's server would have it. float32 (where
# AMX would make the weights bf16 by default), over the file's own blocks: the greedy tokens are compared with
# transformers' in float32.
FLAGS = ["--decode-batch-buckets", "1", "4", "--prefill-row-buckets", "1", "--prefill-token-buckets", "64",
         "--dtype", "float32"]
CAPITAL = "What is the capital of France?"
NUMBERS = "List the numbers from 1 to 10, separated by commas."
PLANETS = "Name the first three planets of the solar system, in order from the Sun."
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def model_file() -> Path:
    try:
        return smollm2_gguf()
    except RuntimeError as error:
        pytest.fail(f"the real model is missing and could not be fetched ({error}); fetch it with "
                    "`python -m tests.real_model`, or put the file in .models/ by hand")


@pytest.fixture(scope="module")
def server(model_file: Path) -> Iterator[tuple[ServerProcess, str]]:
    """The server's process, started (not yet ready), and its URL."""
    port = free_port()
    server = ServerProcess([console_script("xlserve"), "serve", "api_server", str(model_file), "--server-name",
                            "127.0.0.1", "--server-port", str(port), "--model-name", MODEL_NAME, *FLAGS])
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server: tuple[ServerProcess, str], hf_model) -> openai.OpenAI:
    """The ready server's client. transformers loads the file (`hf_model`, which most tests here need) while the
    server starts: its start is compiling, in another process, most of that time."""
    process, base_url = server
    process.wait_ready(base_url)
    return openai_client(f"{base_url}/v1", "unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_model(model_file: Path):  # transformers' own GGUF loader, float32
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_file.parent, gguf_file=model_file.name,
                                                dtype=torch.float32).eval()


def ask(client: openai.OpenAI, question: str, **options):
    return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=MAX_TOKENS, **options)


def test_a_factual_answer_in_a_turn_the_template_ends(client):
    reply = ask(client, CAPITAL)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content, choice.message.content
    # The model closed its turn with <|im_end|> long before max_tokens; the marker itself is not text.
    assert choice.finish_reason == "stop" and reply.usage.completion_tokens < MAX_TOKENS // 2
    assert "<|im_end|>" not in choice.message.content and "<|im_start|>" not in choice.message.content


def test_a_stop_string_cuts_the_answer_where_it_says(client):
    whole = ask(client, NUMBERS).choices[0]
    assert whole.message.content.startswith("1, 2, 3, 4, 5, 6, 7"), whole.message.content
    cut = ask(client, NUMBERS, stop=[", 6"]).choices[0]
    assert cut.message.content == whole.message.content.split(", 6")[0] == "1, 2, 3, 4, 5"
    assert cut.finish_reason == "stop"


def test_a_streamed_answer_equals_the_answer_in_one_piece(client):
    whole = ask(client, PLANETS).choices[0]
    chunks = list(ask(client, PLANETS, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert text == whole.message.content and "Mercury" in text
    assert finish == [whole.finish_reason] == ["stop"]


@pytest.mark.parametrize("question", [NUMBERS, PLANETS])
def test_greedy_tokens_equal_transformers_on_the_same_weights(client, hf_model, model_file, question):
    tokenizer = Tokenizer.from_pretrained(str(model_file))
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]),
                              add_special_tokens=False)
    reply = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    theirs = out[0, len(prompt):].tolist()
    assert reply.choices[0].text == tokenizer.decode(theirs)
    assert reply.usage.completion_tokens == len(theirs)


@pytest.fixture(scope="module")
def capital_prompt(model_file: Path) -> list[int]:
    tokenizer = Tokenizer.from_pretrained(str(model_file))
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": CAPITAL}]),
                            add_special_tokens=False)


@pytest.fixture(scope="module")
def capital_logits(model_file: Path, capital_prompt: list[int]) -> np.ndarray:  # ours, float32
    return our_logits(model_file, capital_prompt)


def test_logits_equal_transformers_loading_the_same_file(hf_model, model_file, capital_prompt, capital_logits):
    ours, theirs = capital_logits, transformers_logits(model_file, capital_prompt, hf_model)
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)  # logits of about +-40; float32 sums differ
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_the_files_own_blocks_give_the_float32_weights_logits(model_file, capital_prompt, capital_logits):
    """The server's format here (`--dtype float32` over a Q4_1 file): the same float32 weights, read as 4.5
    bits each, so the logits differ from float32 weights' only by the order of float32 sums."""
    blocks = our_logits(model_file, capital_prompt, weight_quant="q4_1")
    np.testing.assert_allclose(blocks, capital_logits, atol=2e-3, rtol=0)
    assert (blocks.argmax(-1) == capital_logits.argmax(-1)).all()


def test_bf16_weights_keep_the_answers_and_stay_near_the_float32_logits(model_file, capital_prompt, capital_logits):
    """`--weight-quant bf16` (this quantized GGUF's default where the CPU has a bfloat16 dot: AMX or
    AVX512-BF16): every weight and the KV cache rounded to bfloat16 move a logit of about +-40 by at most half a
    unit, the prompt's next-token choices stay float32's, and the greedy answers stay right."""
    from serving import GenerationConfig, pipeline
    from xlkernels.native_build import cpu_has_bf16_dots

    f32, bf16 = capital_logits, our_logits(model_file, capital_prompt, weight_quant="bf16")
    assert np.abs(f32 - bf16).max() < 1.0 and (f32.argmax(-1) == bf16.argmax(-1)).mean() >= 0.95  # 0.73, 1.0 here
    options = dict(decode_batch_buckets=(1,), prefill_row_buckets=(1,), prefill_token_buckets=(64,))
    if not cpu_has_bf16_dots():  # asked for; with AMX or AVX512-BF16, the default
        options["weight_quant"] = "bf16"
    greedy = GenerationConfig(max_new_tokens=MAX_TOKENS)
    with pipeline(str(model_file), **options) as pipe:
        assert pipe.engine.quantization_name == "bf16 weights, bf16 KV"
        capital, numbers = pipe([[{"role": "user", "content": q}] for q in (CAPITAL, NUMBERS)], greedy)
    assert "Paris" in capital.text and numbers.text.startswith("1, 2, 3, 4, 5, 6, 7"), (capital.text, numbers.text)
