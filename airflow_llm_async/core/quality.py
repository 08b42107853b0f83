"""Quality checks on an answer's text, without I/O.

The article's rules are the base: an answer shorter than 50 characters should be retried,
one containing a refusal marker (错误, 抱歉) should go to a fallback. The same checks serve
``LLMQualityBranchOperator`` (routing after the fact) and the trigger (gating before the
task ends), so a spec is plain JSON-safe data that travels in trigger kwargs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import jsonschema

ARTICLE_MIN_CHARS = 50
ARTICLE_REFUSAL_MARKERS = ("错误", "抱歉")

_KNOWN_KEYS = (
    "min_chars",
    "refusal_markers",
    "regex",
    "reject_finish_reasons",
    "require_json",
    "json_schema",
)


@dataclass(frozen=True)
class QualitySpec:
    """What a good answer looks like. Every rule is optional; an empty spec passes everything."""

    min_chars: int = 0
    refusal_markers: tuple[str, ...] = ()
    regex: str | None = None
    reject_finish_reasons: tuple[str, ...] = ()
    require_json: bool = False
    # A JSON Schema the answer (parsed as JSON) must match; implies require_json.
    json_schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise ValueError(f"quality min_chars must be an integer >= 0, got {self.min_chars!r}")
        for name in ("refusal_markers", "reject_finish_reasons"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"quality {name} must be a list of non-empty strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.json_schema is not None:
            if not isinstance(self.json_schema, dict):
                raise ValueError(
                    f"quality json_schema must be a JSON Schema object, got {self.json_schema!r}"
                )
            try:
                jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"quality json_schema is not a valid JSON Schema: {exc.message}") from None
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"quality regex {self.regex!r} does not compile: {exc}") from None

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> QualitySpec:
        if spec is None:
            return NO_RULES  # the common case, once per call: no need to validate it again
        if not isinstance(spec, dict):
            raise ValueError(f"quality must be a dict of rules, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(_KNOWN_KEYS))
        if unknown:
            raise ValueError(f"unknown quality rule(s) {unknown}; valid rules are {list(_KNOWN_KEYS)}")
        return cls(**spec)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["refusal_markers"] = list(self.refusal_markers)
        data["reject_finish_reasons"] = list(self.reject_finish_reasons)
        return data

    def check(self, text: str | None, finish_reason: str | None = None) -> list[dict[str, str]]:
        """The rules this answer breaks, in the article's order (length first); empty when it passes."""
        text = text or ""
        failures = []
        if len(text.strip()) < self.min_chars:
            failures.append(
                {
                    "rule": "min_chars",
                    "detail": f"{len(text.strip())} chars, at least {self.min_chars} needed",
                }
            )
        found = [marker for marker in self.refusal_markers if marker in text]
        if found:
            failures.append({"rule": "refusal_markers", "detail": f"contains {found}"})
        # re caches compiled patterns, so searching by the source string costs no recompilation.
        if self.regex is not None and not re.search(self.regex, text):
            failures.append({"rule": "regex", "detail": f"does not match {self.regex!r}"})
        if finish_reason in self.reject_finish_reasons:
            failures.append({"rule": "finish_reason", "detail": f"finish_reason is {finish_reason!r}"})
        if self.require_json or self.json_schema is not None:
            try:
                document = json.loads(text)
            except ValueError as exc:
                failures.append({"rule": "require_json", "detail": f"not valid JSON: {exc}"})
            else:
                if self.json_schema is not None:
                    error = jsonschema.exceptions.best_match(
                        jsonschema.validators.validator_for(self.json_schema)(self.json_schema).iter_errors(
                            document
                        )
                    )
                    if error is not None:
                        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                        failures.append({"rule": "json_schema", "detail": f"at {where}: {error.message}"})
        return failures


NO_RULES = QualitySpec()
ARTICLE_RULES = QualitySpec(min_chars=ARTICLE_MIN_CHARS, refusal_markers=ARTICLE_REFUSAL_MARKERS)
