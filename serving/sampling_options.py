"""Per-request sampling options and the sampler's per-row columns, each declared once.

A numeric option is a field of `GenerationConfig` declared with `option(...)`: its name, type (from the
annotation), default and valid range live there and nowhere else. From that declaration come
`GenerationConfig.validate` (type and range, the engine's own check), the HTTP fields' bounds
(`serving.http.protocol.option_type`, which may be narrower, as OpenAI's are) and, for options the
sampler reads (`column=True`), a column of the packed per-row matrices the host sends each step
(`serving.engine.sampling.SAMPLING_INTS` / `SAMPLING_FLOATS`) and the field of the same name that
`unpack_sampling` gives the jitted sampler. A column that is not an option (a request's seed words, its
stop ids held back for `min_new_tokens`, the step's index) is a `RowColumn` in
`serving.engine.sampling.DERIVED_COLUMNS`, with the function that computes it from the request.

To add a per-row option:
1. Declare it on `GenerationConfig` (serving/request.py): `my_option: float = option(0.0, low=-1, high=1,
   column=True)`; `neutral` is the value of a row that does not use it (padding rows), if not the default.
2. Map the HTTP field onto it in `serving/http/params.py` and declare the field in `serving/http/protocol.py`
   with `option_type("my_option")`.
3. Read `params.my_option` (f32[B] or i32[B]) in `serving/engine/sampling.py`. Nothing else: the column,
   the packing, the unpacking, the padding rows and the validation follow from the declaration.
A per-row column computed from the request rather than given by the user (a grammar id, say) is one
`RowColumn` in `sampling.DERIVED_COLUMNS`; state that changes on the device from step to step (an automaton state)
belongs with the runner's per-slot device tables instead, as `last_tokens` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.request import EngineRequest

_OPTION = "sampling_option"


@dataclass(frozen=True)
class Option:
    """A numeric option's range and how it reaches the sampler (see the module docstring)."""

    low: float
    high: float
    low_open: bool = False  # (low, ...] rather than [low, ...]
    high_open: bool = False
    api_high: float | None = None  # a narrower upper bound on the HTTP API (OpenAI's), if any
    column: bool = False  # the sampler reads it per row
    neutral: float | int | None = None  # a column's value on rows that do not use it; None: the default
    why: str = ""  # appended to the range in an error message (e.g. "0 disables it")
    row: Callable[[Any], Any] | None = None  # a column's value from the config; None: the field's value

    def problem(self, value: Any, kind: type) -> str | None:
        """Why `value` is not a valid value of this option (of type `kind`), or None when it is."""
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            return "must be an integer"
        if kind is float:
            if not isinstance(value, int | float) or isinstance(value, bool):
                return "must be a number"
            if not math.isfinite(value):
                return "must be finite"
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            return f"must be in {self.range_text()}" + (f" ({self.why})" if self.why else "")
        return None

    def range_text(self, high: float | None = None) -> str:
        high = self.high if high is None else high
        return f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(high)}{')' if self.high_open else ']'}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def option(default: Any, *, low: float, high: float, **spec: Any) -> Any:
    """A `GenerationConfig` field declared as a sampling option (`Option`'s fields as keywords)."""
    return dataclasses.field(default=default, metadata={_OPTION: Option(low=low, high=high, **spec)})


@dataclass(frozen=True)
class Declared:
    """One declared option: its field name, Python type (int or float), default and `Option`."""

    name: str
    kind: type
    default: Any
    spec: Option
    nullable: bool  # None is a valid value (the option is off)

    @property
    def neutral(self) -> Any:
        return self.default if self.spec.neutral is None else self.spec.neutral


def declared_options(config_class: type) -> Iterator[Declared]:
    """The options a dataclass declares with `option(...)`, in field order."""
    for f in dataclasses.fields(config_class):
        spec = f.metadata.get(_OPTION)
        if spec is None:
            continue
        annotation = str(f.type)
        kind = float if annotation.startswith("float") else int
        yield Declared(f.name, kind, f.default, spec, nullable="None" in annotation)


@dataclass(frozen=True)
class RowColumn:
    """A column of the sampler's packed rows that is computed from the request, not given as an option.

    `value(request)` is the row's value when the request takes its slot; None for a column the runner
    sets every step (`step`). `width` values per row; `dtype` is "i32" or "f32"."""

    name: str
    dtype: str
    width: int
    padding: Any
    value: Callable[[EngineRequest], Any] | None
