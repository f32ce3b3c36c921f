"""JSON Schema → a regular expression of the JSON texts that validate, for the schemas whose language is regular.

Every keyword that constrains a value is either enforced by the expression or refused: `Unsupported`
names a keyword nothing here can enforce (the request gets a 400 naming it), `NotRegular` a schema
whose language is not regular (recursion, free-form values), which a caller may hand to a grammar
engine instead. Annotations (`title`, `description`, ...) change nothing and are ignored.

The texts are compact JSON with at most one space between tokens, and numbers and unbounded strings
have bounded lengths (`MAX_DIGITS`): still valid JSON, but a model can never stall inside a value
(a random model otherwise writes whitespace or digits until its token limit). Object properties come
in the schema's order; an optional one may be left out. `oneOf` is read as `anyOf` (its branches'
exclusivity is not checked). Numeric bounds are enforced exactly for integers; for numbers when the
bounds are whole numbers (else `NotRegular`: a grammar engine handles them).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

WS = "[ ]?"
MAX_DIGITS = 15  # of an integer part, a fraction, and an unbounded integer
MAX_STRING = 256  # characters of a string without maxLength
_CHAR = r'([^"\\\x00-\x1f]|\\["\\/bfnrt])'
_FRACTION = rf"(\.[0-9]{{1,{MAX_DIGITS}}})?"
_NAT = rf"(0|[1-9][0-9]{{0,{MAX_DIGITS - 1}}})"
_FORMATS = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
_FORMATS["date-time"] = _FORMATS["date"] + "T" + _FORMATS["time"]
_ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
                          "readOnly", "writeOnly", "$defs", "definitions"})
_BY_TYPE = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "boolean": set(),
    "null": set(),
}
_SCALARS = {"boolean": "(true|false)", "null": "null"}


def escape(text: str) -> str:
    """`text` as a literal in the regex dialect of outlines-core and llguidance (Rust's `regex`), which
    refuses escapes of characters that need none (Python's `re.escape` escapes spaces)."""
    return re.sub(r"([\\.^$|?*+()\[\]{}-])", r"\\\1", text)


class Unsupported(ValueError):
    """A keyword (or value of one) that cannot be enforced."""

    def __init__(self, keyword: str, why: str):
        super().__init__(f"JSON schema keyword {keyword!r} cannot be enforced: {why}")
        self.keyword = keyword


class NotRegular(ValueError):
    """A schema whose valid texts are not a regular language (or not one this module builds)."""


def schema_regex(schema: Any) -> str:
    """The regular expression of `schema`'s JSON texts; raises Unsupported or NotRegular."""
    return _Builder(schema).value(schema, ())


class _Builder:
    def __init__(self, root: Any):
        self.root = root

    def value(self, schema: Any, refs: tuple[str, ...]) -> str:
        if schema is True or schema == {}:
            raise NotRegular("a schema that allows any JSON value")
        if not isinstance(schema, dict):
            raise Unsupported("schema", f"a schema must be an object, got {json.dumps(schema)[:40]}")
        if "$ref" in schema:
            return self.ref(schema, refs)
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            if not isinstance(values, list) or not values:
                raise Unsupported("enum", "it must be a non-empty list")
            return "(" + "|".join(escape(json.dumps(v, separators=(",", ":"))) for v in values) + ")"
        for keyword in ("anyOf", "oneOf", "allOf"):
            if keyword in schema:
                return self.combined(schema, keyword, refs)
        kind = schema.get("type")
        if kind is None:
            raise NotRegular("a schema without `type` allows values of any type")
        if isinstance(kind, list):
            rest = {k: v for k, v in schema.items() if k != "type"}
            return "(" + "|".join(self.value({**rest, "type": t}, refs) for t in kind) + ")"
        if kind not in _BY_TYPE:
            raise Unsupported("type", f"unknown type {kind!r}")
        for keyword in schema:
            if keyword not in _BY_TYPE[kind] and keyword not in _ANNOTATIONS and keyword != "type":
                raise Unsupported(keyword, f"not supported for type {kind!r}")
        if kind in _SCALARS:
            return _SCALARS[kind]
        return getattr(self, kind)(schema, refs)

    def ref(self, schema: dict, refs: tuple[str, ...]) -> str:
        target = schema["$ref"]
        if len(schema) > 1 and set(schema) - _ANNOTATIONS - {"$ref"}:
            raise Unsupported("$ref", "keywords beside a $ref")
        if target in refs:
            raise NotRegular(f"the schema is recursive ({target})")
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", target) if isinstance(target, str) else None
        if match is None or match.group(2) not in self.root.get(match.group(1), {}):
            raise Unsupported("$ref", f"only local #/$defs/NAME references, got {target!r}")
        return self.value(self.root[match.group(1)][match.group(2)], (*refs, target))

    def combined(self, schema: dict, keyword: str, refs: tuple[str, ...]) -> str:
        branches = schema[keyword]
        if set(schema) - _ANNOTATIONS - {keyword}:
            raise Unsupported(keyword, f"keywords beside {keyword}")
        if not isinstance(branches, list) or not branches:
            raise Unsupported(keyword, "it must be a non-empty list")
        if keyword == "allOf":
            if len(branches) != 1:
                raise Unsupported("allOf", "only a single schema (an intersection is not enforced)")
            return self.value(branches[0], refs)
        return "(" + "|".join(self.value(branch, refs) for branch in branches) + ")"

    def string(self, schema: dict, refs: tuple[str, ...]) -> str:
        if "pattern" in schema:
            if {"minLength", "maxLength", "format"} & set(schema):
                raise Unsupported("pattern", "together with minLength, maxLength or format")
            pattern = schema["pattern"]
            pattern = pattern[1:] if pattern.startswith("^") else pattern
            pattern = pattern[:-1] if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
            return f'"({pattern})"'
        if "format" in schema:
            if schema["format"] not in _FORMATS:
                raise Unsupported("format", f"{schema['format']!r} (known: {', '.join(_FORMATS)})")
            return f'"{_FORMATS[schema["format"]]}"'
        low, high = _count(schema, "minLength", 0), _count(schema, "maxLength", None)
        if high is None:
            high = max(low, MAX_STRING)
        if low > high:
            raise Unsupported("minLength", "greater than maxLength")
        return f'"{_CHAR}{{{low},{high}}}"'

    def integer(self, schema: dict, refs: tuple[str, ...]) -> str:
        low, high = _bounds(schema, integral=True)
        return _int_range(low, high)

    def number(self, schema: dict, refs: tuple[str, ...]) -> str:
        low, high = _bounds(schema, integral=False)
        if low is None and high is None:
            return f"-?{_NAT}{_FRACTION}([eE][+-]?[0-9]{{1,3}})?"
        parts = []
        if high is None or high >= 0:  # x = m >= 0
            parts.append(_magnitude(max(low, 0) if low is not None else 0, high))
        if low is None or low < 0:  # x = -m, m > 0 (or -0)
            parts.append("-" + _magnitude(-high if high is not None and high < 0 else 0, None if low is None else -low))
        return "(" + "|".join(parts) + ")"

    def object(self, schema: dict, refs: tuple[str, ...]) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise Unsupported("properties", "it must be an object")
        extra = schema.get("additionalProperties", "properties" not in schema)
        if extra is not False and not properties:
            raise NotRegular("an object with free-form properties")
        required = schema.get("required", [])
        missing = set(required) - set(properties)
        if missing:
            raise Unsupported("required", f"names {sorted(missing)!r}, which are not among the properties")
        items = [(f'{escape(json.dumps(name))}{WS}:{WS}{self.value(sub, refs)}', name in required)
                 for name, sub in properties.items()]
        return rf"\{{{WS}{_members(items)}{WS}\}}"

    def array(self, schema: dict, refs: tuple[str, ...]) -> str:
        if "items" not in schema:
            raise NotRegular("an array of free-form items")
        item = self.value(schema["items"], refs)
        low, high = _count(schema, "minItems", 0), _count(schema, "maxItems", None)
        if high is not None and low > high:
            raise Unsupported("minItems", "greater than maxItems")
        if high == 0:
            return rf"\[{WS}\]"
        more = f"{{{max(low - 1, 0)},{'' if high is None else high - 1}}}"
        body = f"{item}({WS},{WS}{item}){more}"
        return rf"\[{WS}{body if low else f'({body})?'}{WS}\]"


def _members(items: list[tuple[str, bool]]) -> str:
    """Comma-separated `items` (expression, required) in order, the optional ones possibly absent."""
    sep = f"{WS},{WS}"
    if not items:
        return ""
    first_required = next((i for i, (_, req) in enumerate(items) if req), None)
    if first_required is None:  # which one comes first decides where the commas go
        options = []
        for i, (expr, _) in enumerate(items):
            options.append(expr + "".join(f"({sep}{e})?" for e, _ in items[i + 1:]))
        return "(" + "|".join(options) + ")?"
    head = "".join(f"({e}{sep})?" for e, _ in items[:first_required])
    tail = "".join(f"{sep}{e}" if req else f"({sep}{e})?" for e, req in items[first_required + 1:])
    return head + items[first_required][0] + tail


def _count(schema: dict, keyword: str, default: int | None) -> int | None:
    value = schema.get(keyword, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise Unsupported(keyword, "it must be a non-negative integer")
    return value


def _bounds(schema: dict, integral: bool) -> tuple[int | None, int | None]:
    """Inclusive (low, high); for numbers only whole-number inclusive bounds are regular here."""
    low = high = None
    for keyword, is_low, exclusive in (("minimum", True, False), ("exclusiveMinimum", True, True),
                                       ("maximum", False, False), ("exclusiveMaximum", False, True)):
        if keyword not in schema:
            continue
        value = schema[keyword]
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise Unsupported(keyword, "it must be a finite number")
        if not integral and (exclusive or value != int(value)):
            raise NotRegular(f"{keyword} {value} on a number")
        if integral:
            bound = (math.floor(value) + 1 if exclusive else math.ceil(value)) if is_low else \
                (math.ceil(value) - 1 if exclusive else math.floor(value))
        else:
            bound = int(value)
        if is_low:
            low = bound if low is None else max(low, bound)
        else:
            high = bound if high is None else min(high, bound)
    if low is not None and high is not None and low > high:
        raise Unsupported("minimum", "no number lies between the bounds")
    return low, high


def _magnitude(low: int, high: int | None) -> str:
    """Non-negative decimals m with low <= m <= high (None: unbounded), no exponent."""
    if high is None:
        return f"{_nat_at_least(low)}{_FRACTION}"
    exact = f"{high}(\\.0{{1,{MAX_DIGITS}}})?"
    if low == high:
        return exact
    return f"({_nat_range(low, high - 1)}{_FRACTION}|{exact})"


def _int_range(low: int | None, high: int | None) -> str:
    parts = []
    if high is None or high >= 0:
        start = max(low, 0) if low is not None else 0
        parts.append(_nat_at_least(start) if high is None else _nat_range(start, high))
    if low is None or low < 0:
        start = max(-high, 1) if high is not None else 1
        parts.append("-" + (_nat_at_least(start) if low is None else _nat_range(start, -low)))
    return "(" + "|".join(parts) + ")"


def _nat_at_least(low: int) -> str:
    digits = len(str(low))
    if digits >= MAX_DIGITS:
        return _nat_range(low, 10**digits - 1)
    return f"({_nat_range(low, 10**digits - 1)}|[1-9][0-9]{{{digits},{MAX_DIGITS - 1}}})"


def _nat_range(low: int, high: int) -> str:
    """Decimal naturals in [low, high], without leading zeros."""
    parts = []
    while low <= high:
        top = min(high, 10 ** len(str(low)) - 1)
        parts += _same_length(str(low), str(top))
        low = top + 1
    return "(" + "|".join(parts) + ")"


def _same_length(a: str, b: str) -> list[str]:
    """Digit strings of a's length between a and b (a <= b), as alternatives."""
    common = 0
    while common < len(a) and a[common] == b[common]:
        common += 1
    prefix, a, b = a[:common], a[common:], b[common:]
    if not a:
        return [prefix]
    if len(a) == 1:
        return [f"{prefix}[{a}-{b}]"]
    rest = len(a) - 1
    out = []
    first_low, first_high = int(a[0]), int(b[0])
    if a[1:] != "0" * rest:
        out += [prefix + a[0] + p for p in _same_length(a[1:], "9" * rest)]
        first_low += 1
    high_tail = b[1:] != "9" * rest
    if high_tail:
        first_high -= 1
    if first_low <= first_high:
        out.append(f"{prefix}[{first_low}-{first_high}]" + "[0-9]" * rest)
    if high_tail:
        out += [prefix + b[0] + p for p in _same_length("0" * rest, b[1:])]
    return out
