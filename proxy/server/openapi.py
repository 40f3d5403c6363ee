"""The document served at /openapi.json: the packaged base plus what the loaded config decides."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

_BASE = resources.files("proxy.server").joinpath("openapi.json").read_text(encoding="utf-8")


def build_document(provider_names: Sequence[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a gateway serving these providers (names as in the YAML)."""
    document: dict[str, Any] = json.loads(_BASE)
    provider_key = document["components"]["schemas"]["PaymentRequest"]["properties"]["ProviderKey"]
    provider_key["pattern"] = _any_name_in_any_case(provider_names)
    provider_key["examples"] = list(provider_names)
    provider_key["description"] = (
        f"One of the configured providers, case-insensitive: {', '.join(provider_names)}"
    )
    return document


def _any_name_in_any_case(names: Sequence[str]) -> str:
    """A pattern that means the same in ECMA-262 and Python's re (no flags, no `\\Z`).

    The gateway matches ProviderKey case-insensitively, so an enum of the YAML names would refuse
    "mtn", which is served. Names are ASCII letters, digits, `_` and `-` (checked at config load),
    so each letter becomes a two-letter class and nothing else needs escaping.
    """
    alternatives = (
        "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name) for name in names
    )
    return f"^(?:{'|'.join(alternatives)})$(?!\\n)"
