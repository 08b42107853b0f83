"""Typed answers (``output_type``): the JSON Schema a request asks for and its answer must match.

The schema does three things: it goes into the request as ``response_format`` ``json_schema`` (the
server then writes JSON of that shape), it is a quality rule (an answer that does not match is asked
again, then goes down the fallback chain), and the task returns the parsed document instead of text.
"""

from __future__ import annotations

import json
import re
from typing import Any

# OpenAI's rule for response_format.json_schema.name.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def schema_of(output_type: Any) -> dict[str, Any]:
    """The JSON Schema of a pydantic model class, or a JSON Schema dict as given; TypeError otherwise."""
    if isinstance(output_type, dict):
        return output_type
    # Duck-typed, so this module needs no pydantic: BaseModel subclasses have this class method.
    if isinstance(output_type, type) and callable(getattr(output_type, "model_json_schema", None)):
        return output_type.model_json_schema()
    raise TypeError(
        f"output_type must be a pydantic model class or a JSON Schema dict, got {output_type!r:.100}"
    )


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """``response_format`` asking for ``schema``: strict when the schema allows it (see :func:`strict`)."""
    name = _NAME_UNSAFE.sub("_", str(schema.get("title") or "answer"))[:64] or "answer"
    strict_schema = strict(schema)
    return {
        "type": "json_schema",
        "json_schema": {
            "name": name,
            "schema": strict_schema if strict_schema is not None else schema,
            "strict": strict_schema is not None,
        },
    }


def strict(schema: dict[str, Any]) -> dict[str, Any] | None:
    """``schema`` as OpenAI's strict mode takes it, or None if it cannot be (strict mode then stays off).

    Strict mode wants every object closed (``additionalProperties: false``) and every property
    required. A pydantic schema leaves objects open: they are closed here. An optional property, or
    an object left open on purpose, cannot be made strict without changing what the user asked for.
    """
    result = json.loads(json.dumps(schema))  # a copy: the caller's schema stays as it was
    for node in _nodes(result):
        if node.get("type") != "object" and "properties" not in node:
            continue
        properties = node.get("properties") or {}
        if set(node.get("required") or ()) != set(properties):
            return None
        if node.setdefault("additionalProperties", False) is not False:
            return None
    return result


def _nodes(value: Any):
    """Every dict inside a JSON document, the document included."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _nodes(item)
    elif isinstance(value, list):
        for item in value:
            yield from _nodes(item)
