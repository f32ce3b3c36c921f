"""Engine options (LMDeploy's names) and the shape buckets every jitted step is compiled for.

Every step runs at one of a small fixed set of shapes, all compiled at start-up, so nothing compiles
while serving: decode steps are `[B, 1]` with B from `decode_batch_buckets`; prefill steps are `[R, T]`
with R rows from `prefill_row_buckets`, T tokens per row from `prefill_token_buckets`, and R*T within
`max_prefill_token_num`. Presets for GPU, CPU and tests live in `configs/presets.py`.

Packed prefill (`packed_prefill_buckets`): a prefill step's matmuls then compute only its real tokens,
packed end to end and padded to one of N buckets, while attention still sees them as rows of T tokens
(each row one sequence's consecutive chunk). Rows pad only the attention layout, which costs little;
the matmuls, which cost 15 GFLOP a token at 8B, never compute a padded row's tail. One program per N.

Mixed steps (`mixed_decode_buckets`, with packed prefill): a packed prefill step may also carry up to D
decoding rows, whose tokens lead its packed stream, so a turn that has both runs one program and streams
the weights once instead of twice (a decode step's ~5 ms at 8B on an H100). One program per (D, N).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

from configs.presets import PRESETS
from model.config import HEAD_FORMATS, WEIGHT_FORMATS
from serving.request import InvalidRequestError
from xlkernels import KV_FORMATS


class StepShape(NamedTuple):
    """One compiled step: `rows` x `tokens` is the attention layout; `packed` is how many tokens the
    matmuls compute (rows * tokens unless the step packs its real tokens, see the module docstring); the
    first `decode` rows of a mixed step are decoding rows of one token each, whose tokens lead the packed
    stream (`packed` counts them)."""

    rows: int
    tokens: int
    packed: int
    decode: int = 0


# A packed prefill step of N tokens lays them out in max(MIN_PACKED_ROWS, 2 * N / T) rows of T: twice the
# rows the tokens need, so a step can hold about as many prompts' partial last rows as full ones.
MIN_PACKED_ROWS = 4


@dataclass(frozen=True)
class BucketSet:
    decode_batch: tuple[int, ...]
    prefill_rows: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    max_prefill_tokens: int
    packed_prefill: tuple[int, ...] = ()  # N buckets of packed prefill; empty: prefill steps are [R, T] as laid out
    mixed_decode: tuple[int, ...] = ()  # D buckets of decoding rows a packed prefill step may carry; empty: none
    # The shapes compiled so far while the rest still compile in the background (None: every shape). Every
    # choice below picks only among these, so a step never runs a shape that is not compiled yet.
    compiled: frozenset[StepShape] | None = None

    def __post_init__(self) -> None:
        for name in ("decode_batch", "prefill_rows", "prefill_tokens", "packed_prefill", "mixed_decode"):
            values = getattr(self, name)
            if name in ("packed_prefill", "mixed_decode") and not values:
                continue  # optional
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"{name} buckets must be increasing positive integers, got {values}")
        if self.prefill_rows[0] * self.prefill_tokens[0] > self.max_prefill_tokens:
            raise ValueError("the smallest prefill bucket exceeds max_prefill_token_num")
        if self.packed_prefill and len(self.prefill_tokens) != 1:
            raise ValueError("packed prefill takes exactly one prefill token bucket (the row length), got "
                             f"{self.prefill_tokens}")
        if self.mixed_decode and not self.packed_prefill:
            raise ValueError("mixed decode buckets need packed prefill buckets (their tokens join a packed stream)")
        if self.packed_prefill and self.packed_prefill[-1] > self.max_prefill_tokens:
            raise ValueError(f"packed prefill buckets must not exceed max_prefill_token_num "
                             f"({self.max_prefill_tokens}), got {self.packed_prefill}")

    @property
    def max_decode_batch(self) -> int:
        return self.decode_batch[-1]

    def with_compiled(self, shapes: frozenset[StepShape] | None) -> BucketSet:
        """The same buckets, choosing only among `shapes` (None: all of them)."""
        return dataclasses.replace(self, compiled=shapes)

    def usable(self, shape: StepShape) -> bool:
        return self.compiled is None or shape in self.compiled

    @functools.cached_property
    def decode_capacity(self) -> int:
        """The largest decode batch a compiled bucket holds (0: none is compiled yet)."""
        return max((b for b in self.decode_batch if self.usable(StepShape(b, 1, b))), default=0)

    @functools.cached_property
    def max_chunk(self) -> int:
        """The most prompt tokens one row may prefill in one step (0: no prefill bucket is compiled yet)."""
        if self.packed_prefill:
            return self.prefill_tokens[0] if self.prefill_budget else 0
        if self.compiled is None:
            return max(t for t in self.prefill_tokens if self.prefill_rows[0] * t <= self.max_prefill_tokens)
        return max((s.tokens for s in self.prefill_shapes() if self.usable(s)), default=0)

    @functools.cached_property
    def prefill_budget(self) -> int:
        """The most prompt tokens one prefill step may compute."""
        if self.packed_prefill:
            return max((n for n in self.packed_prefill if self.usable(self._packed_shape(n))), default=0)
        return self.max_prefill_tokens

    def decode_bucket(self, batch: int) -> int:
        return next(b for b in self.decode_batch if b >= batch and self.usable(StepShape(b, 1, b)))

    def packed_rows(self, packed: int) -> int:
        """Rows of the attention layout of a packed prefill step of `packed` tokens."""
        return max(MIN_PACKED_ROWS, 2 * -(-packed // self.prefill_tokens[0]))

    def prefill_bucket(self, rows: int, longest: int, total: int) -> StepShape | None:
        """The smallest compiled prefill step holding `rows` chunks of up to `longest` and `total` tokens."""
        if self.packed_prefill:
            if longest > self.prefill_tokens[0]:
                return None
            return next((self._packed_shape(n) for n in self.packed_prefill
                         if n >= total and self.packed_rows(n) >= rows and self.usable(self._packed_shape(n))), None)
        # The fewest tokens a row, then the fewest rows: with every shape compiled, the smallest of each.
        return next((StepShape(r, t, r * t) for t in self.prefill_tokens if t >= longest
                     for r in self.prefill_rows if r >= rows and r * t <= self.max_prefill_tokens
                     and self.usable(StepShape(r, t, r * t))), None)

    def mixed_bucket(self, decode_rows: int, rows: int, longest: int, total: int) -> StepShape | None:
        """The smallest compiled mixed step holding `decode_rows` decoding rows beside `rows` prompt chunks of up
        to `longest` and `total` tokens (None: no mixed bucket holds them)."""
        prefill = self.prefill_bucket(rows, longest, total) if self.mixed_decode else None
        if prefill is None:
            return None
        shapes = (self._mixed_shape(d, prefill) for d in self.mixed_decode if d >= decode_rows)
        return next((shape for shape in shapes if self.usable(shape)), None)

    def _packed_shape(self, packed: int) -> StepShape:
        return StepShape(self.packed_rows(packed), self.prefill_tokens[0], packed)

    @staticmethod
    def _mixed_shape(decode_rows: int, prefill: StepShape) -> StepShape:
        return StepShape(decode_rows + prefill.rows, prefill.tokens, decode_rows + prefill.packed, decode_rows)

    def packed_bucket_below(self, total: int) -> int | None:
        """The largest packed prefill bucket of at most `total` tokens (None: unpacked, or none that small)."""
        return next((n for n in reversed(self.packed_prefill) if n <= total and self.usable(self._packed_shape(n))),
                    None)

    def shapes(self) -> list[StepShape]:
        """Every step shape to compile: decode buckets first, then the prefill shapes, then the mixed ones."""
        return ([StepShape(b, 1, b) for b in self.decode_batch] + self.prefill_shapes()
                + [self._mixed_shape(d, s) for d in self.mixed_decode for s in self.prefill_shapes()])

    def essential_shapes(self) -> list[StepShape]:
        """The buckets a server needs before it can make progress on any request: the smallest decode bucket
        and the smallest prefill shape (a prompt then prefills one chunk a step until larger ones compile)."""
        return [StepShape(self.decode_batch[0], 1, self.decode_batch[0]), self.prefill_shapes()[0]]

    def prefill_shapes(self) -> list[StepShape]:
        if self.packed_prefill:
            return [self._packed_shape(n) for n in self.packed_prefill]
        return [StepShape(r, t, r * t) for r in self.prefill_rows for t in self.prefill_tokens
                if r * t <= self.max_prefill_tokens]


LOGPROBS_MODES = ("raw", "processed")


@dataclass
class EngineConfig:
    """Options of the engine; the CLI flags and `pipeline(**options)` map onto these names."""

    # KV cache
    page_size: int = 64  # LMDeploy's --cache-block-seq-len
    num_pages: int | None = None  # explicit page count; overrides cache_max_entry_count
    cache_max_entry_count: float = 0.8  # fraction of free accelerator memory after weights
    session_len: int | None = None  # max tokens of one sequence; default: the model's max positions
    enable_prefix_caching: bool = True
    # KV pages quantized per token and KV head (LMDeploy's --quant-policy): 0 (the serving dtype), 8 (int8),
    # 4 (int4, two per byte) or fp8 (e4m3); the same memory then holds proportionally more pages
    quant_policy: str = "0"
    # batching
    max_batch_size: int | None = None  # running sequences; default: the preset's largest decode bucket
    max_prefill_token_num: int | None = None  # tokens one prefill step may process
    preset: str = "auto"  # bucket preset in configs/presets.py: auto (gpu or cpu), gpu, cpu, test
    decode_batch_buckets: tuple[int, ...] | None = None
    prefill_row_buckets: tuple[int, ...] | None = None
    prefill_token_buckets: tuple[int, ...] | None = None
    # Prefill steps compute their real tokens packed, padded to one of these counts (config.py's docstring)
    packed_prefill_buckets: tuple[int, ...] | None = None
    # Decoding rows a packed prefill step may carry (config.py's docstring); None: the preset's
    mixed_decode_buckets: tuple[int, ...] | None = None
    # model
    dtype: str = "auto"  # auto (the checkpoint's on GPU, float32 on CPU), bfloat16, float16, float32
    # Linear layers' weights quantized at load with per-output-channel scales: int8 or fp8 (e4m3); or bf16
    # (CPU: matmul weights and KV pages in bfloat16 under float32 activations); None keeps `dtype`, or the checkpoint's
    # own quantization (a Hugging Face FP8 checkpoint serves as fp8)
    weight_quant: str | None = None
    # The LM head quantized at load too: int8, one scale per vocabulary row (model/config.py's HEAD_FORMATS); None
    # keeps it in the serving dtype
    lm_head_quant: str | None = None
    # auto: the checkpoint's safetensors; dummy: random weights at the checkpoint's shapes, for
    # benchmarks where only config.json and the tokenizer are at hand (vLLM's --load-format dummy)
    load_format: str = "auto"
    attention_backend: str = "auto"  # xlkernels.BACKENDS: auto = Pallas kernels on GPU, "cpu" on CPU, else XLA
    # Decode rows that share leading KV pages (prefix-cache hits) read them once per tile of rows; Pallas only
    enable_shared_prefix_attention: bool = True
    # States of the device pool of regular structured-output constraints (serving/engine/guided.py)
    guided_decoding_states: int = 2048
    tp: int = 1
    # raw: log probabilities are the log-softmax of the model's logits (vLLM's default); processed: of the
    # logits each row samples from, after penalties, bias, temperature and filters
    logprobs_mode: str = "raw"
    seed: int = 0  # base for the seeds of requests that bring none
    # JAX's persistent compilation cache (serving/engine/compile_cache.py): auto (a per-user directory
    # on accelerators, off on CPU), off, or a directory
    compilation_cache_dir: str = "auto"
    # Several hosts (serving/engine/multihost.py): unset ones come from LeaderWorkerSet's or JAX's variables
    nnodes: int | None = None
    node_rank: int | None = None
    dist_init_addr: str | None = None  # HOST:PORT of rank 0's JAX coordinator; its plan channel is PORT + 1
    dist_timeout: float = 15.0  # seconds of silence after which a peer is lost and every process exits
    dist_init_timeout: float = 300.0  # seconds to wait for every process to join
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise InvalidRequestError(f"engine option {name} {why}, got {getattr(self, name)!r}", param=name)

        check(isinstance(self.page_size, int) and self.page_size >= 1 and self.page_size & (self.page_size - 1) == 0,
              "page_size", "must be a power of two")
        check(self.num_pages is None or (isinstance(self.num_pages, int) and self.num_pages >= 2),
              "num_pages", "must be at least 2")
        check(isinstance(self.cache_max_entry_count, int | float) and 0 < self.cache_max_entry_count <= 1,
              "cache_max_entry_count", "must be in (0, 1]")
        check(self.session_len is None or (isinstance(self.session_len, int) and self.session_len >= 2),
              "session_len", "must be at least 2")
        check(self.max_batch_size is None or (isinstance(self.max_batch_size, int) and self.max_batch_size >= 1),
              "max_batch_size", "must be at least 1")
        check(self.dtype in ("auto", "bfloat16", "float16", "float32"), "dtype",
              "must be auto, bfloat16, float16 or float32")
        self.quant_policy = str(self.quant_policy)  # LMDeploy's API takes 0/4/8 as ints
        check(self.quant_policy in KV_FORMATS, "quant_policy", f"must be one of {', '.join(KV_FORMATS)}")
        check(self.weight_quant in (None, *WEIGHT_FORMATS), "weight_quant",
              f"must be one of {', '.join(WEIGHT_FORMATS)}")
        check(self.lm_head_quant in (None, *HEAD_FORMATS), "lm_head_quant", f"must be one of {', '.join(HEAD_FORMATS)}")
        check(isinstance(self.tp, int) and self.tp >= 1, "tp", "must be at least 1")
        # Under tensor parallelism the head is split by vocabulary row: its blocked product would gather it
        check(self.lm_head_quant is None or self.tp == 1, "lm_head_quant", "is not served with --tp above 1 yet")
        check(isinstance(self.guided_decoding_states, int) and self.guided_decoding_states >= 1,
              "guided_decoding_states", "must be at least 1")
        check(self.load_format in ("auto", "dummy"), "load_format", "must be auto or dummy")
        check(self.logprobs_mode in LOGPROBS_MODES, "logprobs_mode", "must be raw or processed")
        check(isinstance(self.compilation_cache_dir, str) and self.compilation_cache_dir != "",
              "compilation_cache_dir", "must be auto, off or a directory")

    @classmethod
    def from_options(cls, **options: object) -> EngineConfig:
        """Build from keyword options, naming any unknown option rather than ignoring it."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidRequestError(f"unknown engine option(s): {', '.join(unknown)}", param=unknown[0])
        return cls(**options)  # type: ignore[arg-type]

    def buckets(self, platform: str) -> BucketSet:
        """The bucket set for this platform, with explicit options overriding the preset."""
        preset = preset_buckets(self.preset, platform)
        max_tokens = self.max_prefill_token_num or preset.max_prefill_tokens
        decode = self.decode_batch_buckets or preset.decode_batch
        if self.max_batch_size is not None:
            decode = tuple(b for b in decode if b < self.max_batch_size) + (self.max_batch_size,)
        # Where every preset row length exceeds --max-prefill-token-num, a row holds that many tokens.
        tokens = self.prefill_token_buckets or (tuple(t for t in preset.prefill_tokens if t <= max_tokens)
                                                or (max_tokens,))
        rows = self.prefill_row_buckets or preset.prefill_rows
        # Explicit prefill token or packed buckets describe the prefill steps whole: the preset adds no
        # packing or mixed steps to them.
        presets_prefill = self.prefill_token_buckets is None and self.packed_prefill_buckets is None
        packed = self.packed_prefill_buckets or (preset.packed_prefill if presets_prefill else ())
        packed = tuple(n for n in packed if n <= max_tokens)
        mixed = self.mixed_decode_buckets or (preset.mixed_decode if presets_prefill and packed else ())
        return BucketSet(decode_batch=tuple(decode), prefill_rows=tuple(r for r in rows if r <= decode[-1]) or (1,),
                         prefill_tokens=tuple(tokens), max_prefill_tokens=max_tokens, packed_prefill=packed,
                         mixed_decode=tuple(d for d in mixed if d <= decode[-1]))


def preset_buckets(name: str, platform: str) -> BucketSet:
    """The named preset of `configs.presets`; `auto` picks `gpu` on accelerators and `cpu` elsewhere."""
    if name == "auto":
        name = "cpu" if platform == "cpu" else "gpu"
    if name not in PRESETS:
        raise ValueError(f"unknown bucket preset {name!r}; choose one of auto, {', '.join(PRESETS)}")
    return BucketSet(**PRESETS[name])  # type: ignore[arg-type]
