"""Structured outputs: a request's format (JSON schema, JSON object, regex, choice) → one
grammar, and per choice a `TokenConstraint` for the engine (engine/constraints.py).

The grammar engine is llguidance (MIT; a Rust core on PyPI with no further dependencies, the one
vLLM also ships): it computes the set of allowed next tokens from the tokenizer's vocabulary in
~90 µs per token on a CPU (SmolLM2's 49k vocabulary, a 3-field JSON schema; bench/RESULTS.md).
The tokenizer's llguidance view is built once per server (~0.4 s) on first use. Sources, in
OpenAI's and vLLM's spellings:

- `response_format: {"type": "json_object"}` → any JSON object;
- `response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- vLLM: `guided_json` (a schema), `guided_regex`, `guided_choice` (a list of strings),
  `guided_grammar` (Lark, or GBNF `root ::= ...` converted to Lark) and
  `structured_outputs: {"json" | "regex" | "choice" | "grammar": ...}`.

An invalid schema or regex is a 400 naming the field. In MARA mode the grammar filters the
candidates before the agent judges them, so the agent aligns the content inside output that is
guaranteed to parse.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch

from mara_serve.server.errors import APIError


class GrammarConstraint:
    """One choice's llguidance matcher as an engine `TokenConstraint`."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        bias = self.matcher.compute_logit_bias()  # one byte per token: 0 or 200
        if self.matcher.is_error():
            raise ValueError(f"output grammar error: {self.matcher.get_error()}")
        flags = torch.frombuffer(bytearray(bias), dtype=torch.uint8)[: self.vocab_size] > 0
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[: flags.numel()] = flags
        return mask

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"token {token_id} not allowed: {self.matcher.get_error()}")


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size,
                    eos_token=list(self.eos_token_ids) or None,
                )  # fmt: skip
            return self._ll_tokenizer

    @staticmethod
    def requested(body: Any) -> bool:
        fmt = getattr(body, "response_format", None)
        return bool(fmt and fmt.get("type", "text") != "text") or any(
            getattr(body, f) is not None
            for f in (
                "guided_json",
                "guided_regex",
                "guided_choice",
                "guided_grammar",
                "structured_outputs",
            )
        )

    def grammar(self, body: Any) -> str | None:
        """The request's grammar (llguidance's serialised form), or None when unconstrained.
        Raises a 400 APIError for a malformed or conflicting format."""

        sources = []
        fmt = getattr(body, "response_format", None)
        if fmt and fmt.get("type", "text") != "text":
            sources.append(("response_format", _response_format_grammar(fmt)))
        if body.guided_json is not None:
            sources.append(("guided_json", _schema_grammar(body.guided_json, "guided_json")))
        if body.guided_regex is not None:
            sources.append(("guided_regex", _regex_grammar(body.guided_regex, "guided_regex")))
        if body.guided_choice is not None:
            sources.append(("guided_choice", _choice_grammar(body.guided_choice, "guided_choice")))
        if body.guided_grammar is not None:
            sources.append(("guided_grammar", _lark_grammar(body.guided_grammar, "guided_grammar")))
        if body.structured_outputs is not None:
            sources.append(("structured_outputs", _structured_outputs(body.structured_outputs)))
        if not sources:
            return None
        if len(sources) > 1:
            raise APIError(
                f"give one output format, not several ({', '.join(n for n, _ in sources)})",
                param=sources[1][0],
            )
        param, grammar = sources[0]
        if body.ignore_eos:  # a complete output allows only EOS: it would never end
            raise APIError("ignore_eos cannot be combined with an output format", param=param)
        return self._validated(grammar, param)

    def schema_grammar(self, schema: dict[str, Any], param: str) -> str:
        """The grammar of one JSON schema (tool calls), validated."""
        return self._validated(_schema_grammar(schema, param), param)

    def _validated(self, grammar: str, param: str) -> str:
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self.ll_tokenizer())
        if error and not error.startswith("WARNING"):
            raise APIError(f"invalid output format: {error}", param=param)
        return grammar

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A fresh matcher for one choice (a constraint is never shared)."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise APIError(f"invalid output format: {matcher.get_error()}", param=None)
        return GrammarConstraint(matcher, self.vocab_size)


def _schema_grammar(schema: Any, param: str) -> str:
    from llguidance import LLMatcher

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise APIError(f"the JSON schema is not valid JSON: {e}", param=param) from e
    if not isinstance(schema, dict):
        raise APIError("the JSON schema must be an object", param=param)
    try:
        # Compact JSON ("," and ":" with no whitespace): free whitespace lets a model pad with
        # blanks forever before the content (a tiny model did, until max_tokens).
        return LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    except ValueError as e:
        raise APIError(f"invalid JSON schema: {e}", param=param) from e


def _regex_grammar(regex: Any, param: str) -> str:
    from llguidance import LLMatcher

    if not isinstance(regex, str) or not regex:
        raise APIError("the regex must be a non-empty string", param=param)
    return LLMatcher.grammar_from_regex(regex)


def _choice_grammar(choices: Any, param: str) -> str:
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):  # fmt: skip
        raise APIError("the choice must be a non-empty list of non-empty strings", param=param)
    return _regex_grammar("(" + "|".join(re.escape(c) for c in choices) + ")", param)


def _response_format_grammar(fmt: dict[str, Any]) -> str:
    kind = fmt.get("type")
    if kind == "json_object":
        return _schema_grammar({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(
                "response_format json_schema needs {'name': ..., 'schema': {...}}",
                param="response_format.json_schema",
            )
        return _schema_grammar(spec.get("schema", {}), "response_format.json_schema")
    raise APIError(
        f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
        param="response_format.type",
    )


def _structured_outputs(spec: Any) -> str:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise APIError(
            "structured_outputs takes exactly one of 'json', 'regex', 'choice' or 'grammar'",
            param="structured_outputs",
        )
    ((kind, value),) = spec.items()
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return _schema_grammar(value, param)
    if kind == "regex":
        return _regex_grammar(value, param)
    if kind == "choice":
        return _choice_grammar(value, param)
    if kind == "grammar":
        return _lark_grammar(value, param)
    raise APIError(
        f"structured_outputs.{kind} is not supported (json, regex, choice, grammar)", param=param
    )


def _lark_grammar(text: Any, param: str) -> str:
    """A context-free grammar: Lark syntax (llguidance's dialect, `start:` the first rule), or
    GBNF (llama.cpp's and xgrammar's EBNF, `root ::= ...`), converted to Lark."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    if not isinstance(text, str) or not text.strip():
        raise APIError("the grammar must be a non-empty string", param=param)
    if "::=" in text:
        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # the converter raises plain exceptions on bad GBNF
            raise APIError(f"invalid GBNF grammar: {e}", param=param) from None
    return LLMatcher.grammar_from_lark(text)
