"""The server's options, declared once and read from either command-line flags or the environment.

`xlserve serve api_server` reads flags (LMDeploy's names); `hypercorn serving.app:app` reads
`XLSERVE_*` variables named after the same flags (`--session-len` is `XLSERVE_SESSION_LEN`, the model
is `XLSERVE_MODEL`). Both end in one `Launch`, so the two ways to start a server cannot drift apart.
Engine options left unset keep `EngineConfig`'s defaults (which depend on the platform's bucket preset),
so the engine stays the single owner of those defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from configs.demo import DEMO_MODEL_NAME
from serving.engine.config import HEAD_FORMATS, LOGPROBS_MODES, EngineConfig
from serving.http.settings import (
    DEFAULT_ENGINE_STALL_TIMEOUT,
    DEFAULT_FIRST_TOKEN_TIMEOUT,
    DEFAULT_MAX_QUEUE_LEN,
    DEFAULT_MAX_REQUEST_BYTES,
    ServerSettings,
)
from serving.text.reasoning import ALIASES as REASONING_ALIASES
from serving.text.reasoning import REASONING_PARSERS, parser_name
from serving.text.templates import ChatTemplate, resolve_chat_template
from serving.text.tool_parsers import ALIASES as TOOL_ALIASES
from serving.text.tool_parsers import TOOL_FORMATS
from xlkernels import BACKENDS

MODEL_ENV = "XLSERVE_MODEL"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

Target = Literal["engine", "server", "cli"]


class OptionError(ValueError):
    """A flag or variable the server cannot start with; the message says what to do instead."""


@dataclass(frozen=True)
class Option:
    flag: str
    target: Target  # engine: an EngineConfig field; server: a ServerSettings field; cli: the CLI's own
    field: str  # the field (or CLI attribute) the value goes to
    help: str
    type: Callable[[str], Any] = str
    default: Any = None  # for cli options; engine and server defaults live in their dataclasses
    choices: tuple[str, ...] | None = None
    kind: Literal["value", "switch", "list"] = "value"
    # A key: the command line shows in `ps`, so the CLI also reads it from the XLSERVE_* variable.
    secret: bool = False

    @property
    def env(self) -> str:
        return "XLSERVE_" + self.flag.removeprefix("--").upper().replace("-", "_")


def _engine_default(field: str) -> Any:
    return next(f.default for f in dataclasses.fields(EngineConfig) if f.name == field)


OPTIONS: tuple[Option, ...] = (
    # ---- server ----
    Option("--server-name", "cli", "server_name", "Host to listen on.", default="0.0.0.0"),
    Option("--server-port", "cli", "server_port", "Port to listen on.", type=int, default=23333),
    Option(
        "--model-name",
        "server",
        "model_name",
        f"Name clients use as `model` (default: the model path as given; {DEMO_MODEL_NAME} for the demo).",
    ),
    Option(
        "--api-keys",
        "server",
        "api_keys",
        "Accepted API keys: clients send `Authorization: Bearer KEY` on every route but /health and /v1/ready. "
        "None given (here, in XLSERVE_API_KEYS or in --api-key-file): no authentication. XLSERVE_API_KEYS "
        "(comma-separated) or --api-key-file keep keys out of the process list.",
        kind="list",
        secret=True,
    ),
    Option(
        "--api-key-file",
        "cli",
        "api_key_file",
        "A file of accepted API keys, one per line (blank lines and lines starting with # are skipped); "
        "added to --api-keys.",
    ),
    Option(
        "--public-metrics",
        "server",
        "public_metrics",
        "Serve GET /metrics without an API key (e.g. to a Prometheus scraper inside the cluster) (default: off).",
        kind="switch",
    ),
    Option(
        "--strict-context-length",
        "server",
        "strict_context_length",
        "Refuse with 400 (context_length_exceeded, as OpenAI does) a request whose max_tokens does not fit in the "
        "session length after its prompt. Default: generate up to the session length and finish with `length`, "
        "as LMDeploy does. A prompt that alone fills the session is a 400 either way.",
        kind="switch",
    ),
    Option(
        "--profile-dir",
        "server",
        "profile_dir",
        "Serve POST /start_profile and POST /stop_profile, which capture a JAX profiler trace of the live "
        "server into this directory (for TensorBoard or Perfetto). Default: no profiling routes.",
    ),
    Option(
        "--engine-process",
        "server",
        "engine_process",
        "Run the engine in a child process of its own, so the server's HTTP work never competes with it for "
        "Python's GIL (on by default; --no-engine-process keeps it on a thread of the server process).",
        kind="switch",
    ),
    Option(
        "--webui",
        "server",
        "webui",
        "Serve the chat page at /chat (on by default; --no-webui turns it off). The page needs no key; the API "
        "calls it makes do.",
        kind="switch",
    ),
    Option(
        "--chat-at-root",
        "server",
        "chat_at_root",
        "GET / redirects to the chat page, and Swagger UI moves to /docs (default: Swagger UI at /).",
        kind="switch",
    ),
    Option(
        "--allow-origins",
        "server",
        "allow_origins",
        "Origins allowed by CORS (e.g. http://localhost:3000, or *). None given: CORS is off.",
        kind="list",
    ),
    Option(
        "--allow-credentials",
        "server",
        "allow_credentials",
        "Allow credentials in CORS requests (default: off).",
        kind="switch",
    ),
    Option("--allow-methods", "server", "allow_methods", "Methods allowed by CORS (default: *).", kind="list"),
    Option("--allow-headers", "server", "allow_headers", "Headers allowed by CORS (default: *).", kind="list"),
    Option(
        "--chat-template",
        "server",
        "chat_template",
        "The chat template: a built-in name (`xlserve list-templates`), hf (the checkpoint's own, the default), "
        "a Jinja file, or a JSON file in LMDeploy's chat template format.",
    ),
    Option(
        "--tool-call-parser",
        "server",
        "tool_call_parser",
        "How the model writes tool calls, to return them as `tool_calls`: qwen (<tool_call> JSON, also "
        "hermes/qwen2_5/qwen3), internlm (<|action_start|><|plugin|>, also internlm2) or llama3 (JSON). "
        "Without it, requests with tools get 400.",
        choices=tuple(TOOL_FORMATS) + tuple(TOOL_ALIASES),
    ),
    Option(
        "--reasoning-parser",
        "server",
        "reasoning_parser",
        "Return <think>...</think> text as `reasoning_content`: deepseek-r1 (the output starts in the "
        "reasoning; also default/qwen-qwq/intern-s1) or qwen3 (only a <think> opens it). A block the "
        "template opens is read from the prompt.",
        choices=REASONING_PARSERS + tuple(REASONING_ALIASES),
    ),
    Option("--log-level", "cli", "log_level", "Log level.", default="WARNING", choices=LOG_LEVELS),
    Option(
        "--max-log-len",
        "server",
        "max_log_len",
        "Most prompt characters written to the INFO log per request (default: all).",
        type=int,
    ),
    Option(
        "--max-request-bytes",
        "server",
        "max_request_bytes",
        f"Largest request body accepted; larger ones get 413 (default: {DEFAULT_MAX_REQUEST_BYTES}).",
        type=int,
    ),
    Option(
        "--max-concurrent-requests",
        "server",
        "max_concurrent_requests",
        "Most choices (prompts × n) generating at once; more wait in a queue (default: twice the largest "
        "decode batch, at least 128).",
        type=int,
    ),
    Option(
        "--max-queue-len",
        "server",
        "max_queue_len",
        f"Most choices waiting for a free slot; beyond it requests get 503 with Retry-After "
        f"(default: {DEFAULT_MAX_QUEUE_LEN}).",
        type=int,
    ),
    Option(
        "--request-timeout",
        "server",
        "request_timeout",
        "Seconds a request may take from arrival to its last token; past it the request is aborted with a "
        "408 (or an error event in a stream). Default: no limit.",
        type=float,
    ),
    Option(
        "--first-token-timeout",
        "server",
        "first_token_timeout",
        "Seconds a request may wait for its first token (queued, then prefilled); past it the request is "
        f"aborted with a 503 the client may retry (default: {DEFAULT_FIRST_TOKEN_TIMEOUT:.0f}; 0: no limit).",
        type=float,
    ),
    Option(
        "--engine-stall-timeout",
        "server",
        "engine_stall_timeout",
        "Seconds the engine may make no progress while requests wait on it; past it the engine counts as "
        "stuck: /health and /v1/ready answer 503 and its requests fail with a 503 the client may retry, until "
        f"it moves again (default: {DEFAULT_ENGINE_STALL_TIMEOUT:.0f}; 0: no watch).",
        type=float,
    ),
    Option(
        "--shutdown-timeout",
        "cli",
        "shutdown_timeout",
        "On SIGTERM/SIGINT, seconds the requests in flight get to finish (new ones get 503) before they are "
        "aborted and the server exits.",
        type=float,
        default=30.0,
    ),
    Option("--backend", "cli", "backend", "Inference backend; xlserve has one.", default="jax", choices=("jax",)),
    Option(
        "--trust-remote-code",
        "cli",
        "trust_remote_code",
        "Accepted for LMDeploy compatibility; xlserve never runs code shipped with a checkpoint.",
        kind="switch",
    ),
    Option(
        "--revision",
        "cli",
        "revision",
        "The branch, tag or commit of a hub id MODEL to serve (default: its main branch).",
    ),
    Option(
        "--download-dir",
        "cli",
        "download_dir",
        "The Hugging Face cache folder a hub id MODEL is downloaded into and served from (default: "
        "huggingface_hub's, ~/.cache/huggingface/hub, or $HF_HOME/hub).",
    ),
    # ---- engine ----
    Option("--tp", "engine", "tp", f"Tensor-parallel degree (default: {_engine_default('tp')}).", type=int),
    Option(
        "--load-format",
        "engine",
        "load_format",
        "auto reads the checkpoint's weights; dummy serves random weights at its shapes, for benchmarks "
        f"(default: {_engine_default('load_format')}).",
        choices=("auto", "dummy"),
    ),
    Option(
        "--dtype",
        "engine",
        "dtype",
        "Weight and activation dtype; auto is the checkpoint's on GPU and float32 on CPU, where a bfloat16 "
        "checkpoint or block-quantized GGUF file keeps its matmul weights in bfloat16 if the CPU has AMX or "
        "AVX512-BF16 (--weight-quant bf16), and otherwise a GGUF file keeps its layers' blocks (--weight-quant "
        "q4_0|q4_1|q8_0); on CPU, bfloat16 is the bf16 format always "
        "(bfloat16 weights and cache, float32 arithmetic); float32 keeps a GGUF file's blocks (exact) and every "
        f"other weight in float32 (default: {_engine_default('dtype')}).",
        choices=("auto", "bfloat16", "float16", "float32"),
    ),
    Option(
        "--session-len",
        "engine",
        "session_len",
        "Most tokens of one sequence, prompt plus completion (default: the model's max positions).",
        type=int,
    ),
    Option(
        "--max-batch-size",
        "engine",
        "max_batch_size",
        "Most sequences decoded together (default: the bucket preset's largest decode batch).",
        type=int,
    ),
    Option(
        "--cache-max-entry-count",
        "engine",
        "cache_max_entry_count",
        f"Fraction of free accelerator memory for the KV cache (default: {_engine_default('cache_max_entry_count')}).",
        type=float,
    ),
    Option(
        "--cache-block-seq-len",
        "engine",
        "page_size",
        f"Tokens per KV-cache page, a power of two (default: {_engine_default('page_size')}).",
        type=int,
    ),
    Option(
        "--quant-policy",
        "engine",
        "quant_policy",
        "KV cache quantization, per token and KV head: 0 (none), 8 (int8), 4 (int4), fp8 (e4m3); the same "
        "--cache-max-entry-count then holds about 1.9x (8, fp8) or 3.8x (4) the pages "
        f"(default: {_engine_default('quant_policy')}).",
        choices=("0", "4", "8", "fp8"),
    ),
    Option(
        "--weight-quant",
        "engine",
        "weight_quant",
        "Quantize the linear layers' weights at load, per output channel: int8 or fp8 (e4m3); or bf16 (CPU: "
        "every matmul weight and the KV cache in bfloat16 under float32 activations, products of several rows "
        "as bf16 dots where the CPU has AMX or AVX512-BF16); or q4_0, q4_1, q8_0 (CPU: GGUF's blocks of 32 weights, "
        "multiplied in float32; a GGUF file's own blocks of that format are kept as they are, exactly) "
        "(default: none; on CPU, under --dtype auto, bf16 for a bfloat16 checkpoint or block-quantized GGUF "
        "file where the CPU has AMX or AVX512-BF16, else a GGUF file's own block format where its layers share "
        "one, which --dtype float32 keeps too; a Hugging Face FP8 checkpoint serves as fp8).",
        choices=("int8", "fp8", "bf16", "q4_0", "q4_1", "q8_0"),
    ),
    Option(
        "--lm-head-quant",
        "engine",
        "lm_head_quant",
        "Quantize the LM head at load too: int8, one scale per vocabulary row, for a model with a head of its own "
        "(not tied to the embedding) under unquantized, int8 or fp8 layers, on one device. A one-row decode step "
        "streams half the head's bytes (Llama-3.1-8B's head is 1 GB in bf16: one stream on an H100 with fp8 layers "
        "+5.5%%), while large fp8 batches pay for converting it (B3 -6%%): a flag for latency. The quality it costs "
        "is in docs/benchmarks.md (default: none: the head keeps the serving dtype, as Hugging Face's FP8 "
        "checkpoints do).",
        choices=HEAD_FORMATS,
    ),
    Option(
        "--num-pages",
        "engine",
        "num_pages",
        "Explicit KV-cache page count; overrides --cache-max-entry-count.",
        type=int,
    ),
    Option(
        "--max-prefill-token-num",
        "engine",
        "max_prefill_token_num",
        "Most prompt tokens one prefill step processes (default: the bucket preset's, 8192 on GPU).",
        type=int,
    ),
    Option(
        "--enable-prefix-caching",
        "engine",
        "enable_prefix_caching",
        "Reuse the KV cache of shared prompt prefixes (on by default; --no-enable-prefix-caching turns it off).",
        kind="switch",
    ),
    Option(
        "--bucket-preset",
        "engine",
        "preset",
        "Shape buckets compiled at start-up: auto picks gpu or cpu by platform "
        f"(default: {_engine_default('preset')}).",
        choices=("auto", "gpu", "cpu", "test"),
    ),
    Option(
        "--decode-batch-buckets",
        "engine",
        "decode_batch_buckets",
        "Decode batch sizes to compile (overrides the preset).",
        type=int,
        kind="list",
    ),
    Option(
        "--prefill-row-buckets",
        "engine",
        "prefill_row_buckets",
        "Prefill row counts to compile (overrides the preset).",
        type=int,
        kind="list",
    ),
    Option(
        "--prefill-token-buckets",
        "engine",
        "prefill_token_buckets",
        "Prefill chunk lengths to compile (overrides the preset).",
        type=int,
        kind="list",
    ),
    Option(
        "--packed-prefill-buckets",
        "engine",
        "packed_prefill_buckets",
        "Token counts a prefill step's matmuls are padded to: prompts are packed end to end, so no row's "
        "tail is computed; one program each (needs exactly one --prefill-token-buckets value, the row length). "
        "The GPU preset packs 128..8192 over 128-token rows with --mixed-decode-buckets 64; giving this or "
        "--prefill-token-buckets replaces the preset's prefill steps, mixed ones included.",
        type=int,
        kind="list",
    ),
    Option(
        "--mixed-decode-buckets",
        "engine",
        "mixed_decode_buckets",
        "Decoding rows a packed prefill step may carry (needs --packed-prefill-buckets): a turn with both "
        "decoding sequences and prompt chunks then runs one program instead of two; one program per pair of a "
        "value here and a packed bucket.",
        type=int,
        kind="list",
    ),
    Option(
        "--attention-backend",
        "engine",
        "attention_backend",
        f"Kernels (attention, add + RMSNorm): auto is our Pallas kernels on GPU, on CPU a native decode "
        f"attention kernel (built on first use with the host's C++ compiler; XLA without one), XLA elsewhere; "
        f"pallas-interpret runs the Pallas kernels anywhere, slowly (default: {_engine_default('attention_backend')}).",
        choices=BACKENDS,
    ),
    Option(
        "--enable-shared-prefix-attention",
        "engine",
        "enable_shared_prefix_attention",
        "Decode rows sharing cached prefix pages read them once per tile of rows, with the Pallas kernels "
        "(on by default; --no-enable-shared-prefix-attention turns it off).",
        kind="switch",
    ),
    Option(
        "--logprobs-mode",
        "engine",
        "logprobs_mode",
        "What log probabilities report: raw is the log-softmax of the model's logits, before any sampling "
        "transform (vLLM's default); processed is that of the logits each row samples from, after penalties, "
        f"logit bias, temperature and top-k/top-p/min-p (default: {_engine_default('logprobs_mode')}).",
        choices=LOGPROBS_MODES,
    ),
    Option(
        "--guided-decoding-states",
        "engine",
        "guided_decoding_states",
        "Automaton states of regular structured-output constraints kept on the device at once (a pool shared "
        "by every grammar in use; a bitmask of the vocabulary each); a constraint that does not fit runs on "
        f"the host (default: {_engine_default('guided_decoding_states')}).",
        type=int,
    ),
    Option(
        "--engine-seed",
        "engine",
        "seed",
        f"Base seed for requests that bring none (default: {_engine_default('seed')}).",
        type=int,
    ),
    Option(
        "--compilation-cache-dir",
        "engine",
        "compilation_cache_dir",
        "Where compiled programs are kept, so a restart loads them instead of tracing and compiling them: "
        "auto (~/.cache/xlserve/jax on GPU, off on CPU), off, or a directory "
        f"(default: {_engine_default('compilation_cache_dir')}).",
    ),
    # ---- several hosts (docs/multi-host.md) ----
    Option(
        "--nnodes",
        "engine",
        "nnodes",
        "Hosts serving this one model, one process each, --tp counting the devices of all (default: "
        "LWS_GROUP_SIZE, else JAX_NUM_PROCESSES, else 1).",
        type=int,
    ),
    Option(
        "--node-rank",
        "engine",
        "node_rank",
        "This host's rank: 0 serves the API, the others follow it (default: LWS_WORKER_INDEX, else "
        "JAX_PROCESS_ID, else 0).",
        type=int,
    ),
    Option(
        "--dist-init-addr",
        "engine",
        "dist_init_addr",
        "HOST:PORT of rank 0's JAX coordinator; rank 0 also listens for its followers on PORT + 1 (default: "
        "JAX_COORDINATOR_ADDRESS, else LWS_LEADER_ADDRESS:29500).",
    ),
    Option(
        "--dist-timeout",
        "engine",
        "dist_timeout",
        f"Seconds of silence after which a host is lost: every process then exits non-zero (default: "
        f"{_engine_default('dist_timeout')}).",
        type=float,
    ),
    Option(
        "--dist-init-timeout",
        "engine",
        "dist_init_timeout",
        f"Seconds to wait for every host to join before giving up (default: {_engine_default('dist_init_timeout')}).",
        type=float,
    ),
    # ---- several servers behind `xlserve serve proxy` ----
    Option(
        "--proxy-url",
        "cli",
        "proxy_url",
        "Register with the proxy (`xlserve serve proxy`) at this URL once GET /v1/ready answers 200, and "
        "deregister on SIGTERM before draining. The server registers as http://HOST:PORT, HOST being "
        "--server-name, or the address that reaches the proxy when that is 0.0.0.0.",
    ),
    Option(
        "--proxy-api-key",
        "cli",
        "proxy_api_key",
        "One of the proxy's --admin-api-keys, sent when registering (or XLSERVE_PROXY_API_KEY).",
        secret=True,
    ),
    Option(
        "--dp",
        "cli",
        "dp",
        "Data-parallel replicas on this host: N servers of --tp devices each, in child processes, behind "
        "one proxy on --server-port (more devices than the host has is an error).",
        type=int,
        default=1,
    ),
)


@dataclass(frozen=True)
class Launch:
    """Everything needed to start a server: the model, the engine's options, the app's and the socket's."""

    model: str | None  # MODEL as given: a local folder or a hub id (model.source resolves it); None: the demo
    engine_config: EngineConfig
    settings: ServerSettings
    host: str = "0.0.0.0"
    port: int = 23333
    log_level: str = "WARNING"
    shutdown_timeout: float = 30.0
    revision: str | None = None  # of a hub id
    download_dir: str | None = None  # where a hub id is downloaded
    proxy_url: str | None = None  # register with this proxy once ready (--proxy-url)
    proxy_api_key: str | None = field(default=None, repr=False)
    dp: int = 1  # replicas behind one proxy (--dp)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="A local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer), or a Hugging "
        "Face hub id (org/name), downloaded first (HF_TOKEN for gated models, HF_ENDPOINT for a mirror, "
        "HF_HUB_OFFLINE=1 to use only the cache). Omitted: the built-in demo model.",
    )
    add_options(parser, OPTIONS)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Declare `options` as flags of `parser` (also used by `xlserve serve proxy`)."""
    for option in options:
        kwargs: dict[str, Any] = {"dest": option.field, "help": option.help, "default": option.default}
        if option.kind == "switch":
            # A switch may default to on, so it also takes a --no- form; unset stays None.
            kwargs["action"] = argparse.BooleanOptionalAction if option.target != "cli" else "store_true"
            kwargs["default"] = None if option.target != "cli" else False
        else:
            kwargs["type"] = option.type
            if option.choices:
                kwargs["choices"] = option.choices
            if option.kind == "list":
                kwargs["nargs"] = "*" if option.field == "api_keys" else "+"
            kwargs["metavar"] = option.field.upper()
        parser.add_argument(option.flag, **kwargs)


def from_arguments(namespace: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Launch:
    values = {o.field: getattr(namespace, o.field) for o in OPTIONS}
    read_secrets(values, OPTIONS, environ)
    return _resolve(namespace.model, values, source=lambda o: o.flag)


def read_secrets(values: dict[str, Any], options: Sequence[Option], environ: Mapping[str, str]) -> None:
    """Fill the secret options not given as flags from their XLSERVE_* variables."""
    for option in options:
        if option.secret and values[option.field] is None and environ.get(option.env):
            values[option.field] = _parse_env(option, environ[option.env])


def from_environment(environ: Mapping[str, str] = os.environ) -> Launch:
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = environ.get(option.env)
        values[option.field] = option.default if raw is None else _parse_env(option, raw)
    return _resolve(environ.get(MODEL_ENV) or None, values, source=lambda o: o.env)


def _parse_env(option: Option, raw: str) -> Any:
    try:
        if option.kind == "switch":
            word = raw.strip().lower()
            if word not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                raise ValueError(f"expected true or false, got {raw!r}")
            return word in ("1", "true", "yes", "on")
        if option.kind == "list":
            return [option.type(item) for item in raw.replace(",", " ").split()]
        value = option.type(raw)
    except ValueError as error:
        raise OptionError(f"{option.env}: {error}") from error
    if option.choices and value not in option.choices:
        raise OptionError(f"{option.env} must be one of {', '.join(option.choices)}, got {value!r}")
    return value


def _resolve(model: str | None, values: dict[str, Any], source: Callable[[Option], str]) -> Launch:
    if model is None:
        for option in (_option("revision"), _option("download_dir")):
            if values[option.field] is not None:
                raise OptionError(f"{source(option)} applies to a hub id MODEL; none was given (the demo model)")
    given = {o.field: values[o.field] for o in OPTIONS if values[o.field] is not None}
    engine_options = {o.field: given[o.field] for o in OPTIONS if o.target == "engine" and o.field in given}
    for name in ("decode_batch_buckets", "prefill_row_buckets", "prefill_token_buckets", "packed_prefill_buckets",
                 "mixed_decode_buckets"):
        if name in engine_options:
            engine_options[name] = tuple(engine_options[name])
    try:
        engine_config = EngineConfig.from_options(**engine_options)
    except ValueError as error:  # InvalidRequestError names the EngineConfig field; show the flag
        flag = next((source(o) for o in OPTIONS if o.field == getattr(error, "param", None)), None)
        raise OptionError(f"{flag}: {error}" if flag else str(error)) from error
    server_options = {o.field: given[o.field] for o in OPTIONS if o.target == "server" and o.field in given}
    if values["api_key_file"] is not None:
        keys = _read_api_keys(values["api_key_file"], source)
        server_options["api_keys"] = [*server_options.get("api_keys", ()), *keys]
    for name in ("api_keys", "allow_origins", "allow_methods", "allow_headers"):
        if name in server_options:
            server_options[name] = tuple(server_options[name])
    if "chat_template" in server_options:
        server_options["chat_template"] = _read_template(server_options["chat_template"], source)
    if "reasoning_parser" in server_options:
        server_options["reasoning_parser"] = parser_name(server_options["reasoning_parser"])
    server_options.setdefault("model_name", model if model is not None else DEMO_MODEL_NAME)
    try:
        settings = ServerSettings(model_path=model, **server_options)
    except ValueError as error:
        flag = next((source(o) for o in OPTIONS if o.field == getattr(error, "param", None)), None)
        raise OptionError(f"{flag}: {error}" if flag else str(error)) from error
    if values["shutdown_timeout"] < 0:
        raise OptionError(f"{source(_option('shutdown_timeout'))} must be >= 0, got {values['shutdown_timeout']}")
    if values["dp"] < 1:
        raise OptionError(f"{source(_option('dp'))} must be at least 1, got {values['dp']}")
    if values["proxy_url"] is not None and not _is_http_url(values["proxy_url"]):
        raise OptionError(f"{source(_option('proxy_url'))} must be an http:// or https:// URL with a host, "
                          f"got {values['proxy_url']!r}")
    return Launch(
        model,
        engine_config,
        settings,
        host=values["server_name"],
        port=values["server_port"],
        log_level=values["log_level"],
        shutdown_timeout=values["shutdown_timeout"],
        revision=values["revision"],
        download_dir=values["download_dir"],
        proxy_url=values["proxy_url"],
        proxy_api_key=values["proxy_api_key"],
        dp=values["dp"],
    )


def _is_http_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _option(field: str) -> Option:
    return next(o for o in OPTIONS if o.field == field)


def _read_api_keys(path: str, source: Callable[[Option], str]) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            lines = [line.strip() for line in file]
    except OSError as error:
        raise OptionError(f"{source(_option('api_key_file'))}: cannot read {path!r}: {error}") from error
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise OptionError(f"{source(_option('api_key_file'))}: {path!r} holds no API key")
    return keys


def _read_template(value: str, source: Callable[[Option], str]) -> ChatTemplate | None:
    option = _option("chat_template")
    try:
        return resolve_chat_template(value)
    except ValueError as error:
        raise OptionError(f"{source(option)}: {error}") from error
