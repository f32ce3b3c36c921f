"""Structured-output constraints compiled against the served tokenizer: what the engine enforces per token.

A constraint (`GuideSpec`: a JSON schema, a regex, a list of choices, a Lark/EBNF grammar, any JSON
object) becomes one of two things (`serving.request.Guide`):

- a `TokenAutomaton` when its language is regular (regexes, choices, JSON schemas that `json_regex`
  turns into a regex): outlines-core builds the token-level automaton of the regex, and its states'
  transitions are folded into token classes (tokens that act alike in every state), which the engine
  keeps on the device and advances inside the decode step;
- a `HostGrammar` otherwise (recursive schemas, free-form JSON objects, grammars), which the engine runs
  on the host with llguidance. `backend="host"` sends a regular constraint there too, as the same
  automaton (so both paths must give the same tokens).

The request's end tokens (its stop ids) are allowed exactly where the constraint is complete. Anything
that cannot be enforced is a `GuideError` naming it, never an unconstrained answer. Compiled guides are
cached by a hash of what they were compiled from. `compile` blocks (outlines-core's index build grows
with the vocabulary and the regex); callers run it on a thread with a time limit.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import outlines_core

from serving.request import Guide, HostGrammar, TokenAutomaton
from serving.text.bad_words import bad_words_automaton
from serving.text.json_regex import NotRegular, Unsupported, escape, schema_regex
from serving.text.tokenizer import Tokenizer

CACHE_SIZE = 256
# Random odd 64-bit multipliers: a token's class signature is a sum of one mixed word per transition.
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], np.uint64)
_END_SIGNATURE = np.uint64(0xFFFFFFFFFFFFFFFF)
# llguidance's JSON options: compact separators, so that a model cannot stall in whitespace.
_COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GuideSpec:
    """A request's constraint. kind: json_schema (source: the schema), json_object, regex (source: the
    pattern), choice (source: the strings), grammar (source: Lark or GBNF text), bad_words (source: the
    banned spellings of several tokens, as token-id lists). param: the request field."""

    kind: str
    source: Any
    param: str
    backend: str = "auto"  # auto | device | host


class GuideError(ValueError):
    """A constraint that cannot be enforced (a 400 naming `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message = message
        self.param = param


class GuideCompiler:
    """Compiles `GuideSpec`s for one tokenizer, with an LRU cache; thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = CACHE_SIZE):
        """vocab_size: the model's (its logits' width), at least the tokenizer's. Cheap: the vocabulary's
        bytes are read on the first compile, on the caller's thread."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: Any = None
        self._token_bytes: dict[bytes, list[int]] = {}
        self._cache: OrderedDict[str, Guide] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer, and the bytes of every token a constraint may use (special
        tokens and tokens of no text never; added tokens that are not special, such as `</tool_call>`, do),
        read once."""
        with self._lock:
            if self._ll_tokenizer is None:
                ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer.hf_tokenizer, n_vocab=self.vocab_size)
                for token in range(self.tokenizer.vocab_size):
                    text = ll_tokenizer.decode_bytes([token])
                    if text and token not in self.tokenizer.all_special_ids:
                        self._token_bytes.setdefault(text, []).append(token)
                self._ll_tokenizer = ll_tokenizer
            return self._ll_tokenizer

    def compile(self, spec: GuideSpec, end_ids: frozenset[int]) -> Guide:
        """The guide of `spec` for a request that ends at any of `end_ids`; raises GuideError."""
        if not end_ids and spec.kind != "bad_words":  # a ban needs no end: it holds wherever the answer stops
            raise GuideError("a constrained answer needs a token that ends it (leave ignore_eos off)", "ignore_eos")
        key = hashlib.sha256(json.dumps([spec.kind, spec.source, sorted(end_ids), spec.backend],
                                        sort_keys=True).encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        guide = self._compile(spec, end_ids, key)
        with self._lock:
            self._cache[key] = guide
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return guide

    def _compile(self, spec: GuideSpec, end_ids: frozenset[int], key: str) -> Guide:
        if spec.kind == "bad_words":
            automaton = bad_words_automaton(spec.source, self.vocab_size, end_ids, key)
            return HostGrammar(key, "automaton", "bad_words", end_ids, automaton) if spec.backend == "host" \
                else automaton
        try:
            regex = _regex(spec)
        except Unsupported as error:
            raise GuideError(str(error), spec.param) from None
        except NotRegular:
            return self._host(spec, end_ids, key)
        automaton = self.automaton(regex, end_ids, key, spec.param)
        if spec.backend == "host":
            return HostGrammar(key, "automaton", regex, end_ids, automaton)
        return automaton

    def automaton(self, regex: str, end_ids: frozenset[int], key: str, param: str) -> TokenAutomaton:
        """outlines-core's index of `regex`, folded into token classes."""
        self.ll_tokenizer  # noqa: B018 (reads the vocabulary's bytes once)
        vocabulary = outlines_core.Vocabulary(
            min(end_ids), {text: ids for text, ids in self._token_bytes.items() if not end_ids.intersection(ids)})
        try:
            index = outlines_core.Index(regex, vocabulary)
        except Exception as error:  # the library's own exception types for a bad or empty pattern
            raise GuideError(f"the constraint cannot be compiled: {error}", param) from None
        return fold_index(index, self.vocab_size, end_ids, key)

    def _host(self, spec: GuideSpec, end_ids: frozenset[int], key: str) -> HostGrammar:
        if spec.kind in ("json_schema", "json_object"):
            schema = {"type": "object"} if spec.kind == "json_object" else spec.source
            kind, text = "json_schema", json.dumps({**schema, "x-guidance": _COMPACT_JSON})
        elif spec.kind == "tool_call":
            kind = "lark"
            text = "start: " + _tool_call_parts(
                spec.source, lambda schema: f"%json {json.dumps({**schema, 'x-guidance': _COMPACT_JSON})}",
                json.dumps, either=" | ", then=" ")
        elif spec.kind == "grammar":
            kind, text = "grammar", spec.source  # Lark or GBNF, told apart by llguidance
        else:
            raise GuideError(f"{spec.kind} cannot be enforced", spec.param)
        try:
            source = llguidance.grammar_from(kind, text)
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self.ll_tokenizer)
        except Exception as error:  # llguidance's errors for text that is not a grammar at all
            raise GuideError(f"the constraint cannot be compiled: {error}", spec.param) from None
        if failed or messages:  # a warning is a part of the constraint that would not be enforced
            raise GuideError(f"the constraint cannot be enforced: {'; '.join(messages)}", spec.param)
        return HostGrammar(key, kind, source, end_ids)


def _regex(spec: GuideSpec) -> str:
    """The regex of a regular constraint; NotRegular for the others, Unsupported for a bad one."""
    if spec.kind == "regex":
        if not isinstance(spec.source, str) or not spec.source:
            raise Unsupported(spec.param, "the pattern must be a non-empty string")
        return spec.source
    if spec.kind == "choice":
        if not isinstance(spec.source, list) or not spec.source or not all(isinstance(c, str) for c in spec.source):
            raise Unsupported(spec.param, "the choices must be a non-empty list of strings")
        return "(" + "|".join(escape(choice) for choice in spec.source) + ")"
    if spec.kind == "json_schema":
        return schema_regex(spec.source)
    if spec.kind == "tool_call":
        return _tool_call_parts(spec.source, schema_regex, escape)
    raise NotRegular(spec.kind)


def _tool_call_parts(source: dict, arguments: Any, literal: Any, either: str = "|", then: str = "") -> str:
    """A constrained tool call's rest (`serving.http.guided`): [name, arguments key,] arguments, close; in
    regex (`schema_regex`, `escape`) or Lark (`%json`, a quoted string) pieces."""
    key = source["arguments_key"]
    options = []
    for name, schema in source["calls"]:
        head = "" if source["named"] else literal(f'{json.dumps(name)[1:-1]}", "{key}": ') + then
        options.append(head + arguments(schema))
    return "(" + either.join(options) + ")" + then + literal(source["close"])


def fold_index(index: Any, vocab_size: int, end_ids: frozenset[int], key: str) -> TokenAutomaton:
    """An outlines-core `Index` as a `TokenAutomaton`: states renumbered from 0, tokens grouped into classes
    of equal behaviour (by a signature summed over each token's transitions, then checked exactly)."""
    transitions = index.get_transitions()
    finals = set(index.get_final_states())
    states = sorted(set(transitions) | finals | {index.get_initial_state()})
    local = {state: i for i, state in enumerate(states)}
    ends = np.array(sorted(end_ids), np.int64)
    edges = []  # (state, tokens, next states) with the end tokens left to their own class
    signature = np.zeros(vocab_size, np.uint64)
    for state, out in transitions.items():
        tokens = np.fromiter(out.keys(), np.int64, len(out))
        nexts = np.fromiter((local[n] for n in out.values()), np.int64, len(out))
        keep = ~np.isin(tokens, ends)
        tokens, nexts = tokens[keep], nexts[keep]
        edges.append((local[state], tokens, nexts))
        with np.errstate(over="ignore"):
            signature[tokens] += (np.uint64(local[state] + 1) * _MIX[0]) ^ ((nexts.astype(np.uint64) + 1) * _MIX[1])
    signature[ends] = _END_SIGNATURE
    _, first, token_class = np.unique(signature, return_index=True, return_inverse=True)
    table = np.full((len(states), len(first)), -1, np.int32)
    for state, tokens, nexts in edges:
        table[state, token_class[tokens]] = nexts
    end_class = token_class[ends[0]]
    final = np.array(sorted(local[s] for s in finals), np.int64)
    final_set = set(final.tolist())
    table[final, end_class] = final  # an end token keeps a final state final (and ends the sequence)
    for state, tokens, nexts in edges:  # a signature collision would merge tokens that differ
        if not np.array_equal(table[state, token_class[tokens]], nexts) or \
                np.count_nonzero(table[state, token_class] >= 0) != len(tokens) + len(ends) * (state in final_set):
            raise RuntimeError("token classes collided; the automaton would be wrong")
    return TokenAutomaton(key, token_class.astype(np.int32), table, local[index.get_initial_state()])
