"""The Terraform files of terraform/, parsed with python-hcl2 into plain dicts and lists."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2

try:  # python-hcl2 >= 7 keeps quotes, comments and block markers unless told otherwise
    from hcl2.utils import SerializationOptions

    _OPTIONS: dict[str, Any] = {
        "serialization_options": SerializationOptions(
            with_comments=False, explicit_blocks=False, strip_string_quotes=True
        )
    }
except ImportError:  # older releases give plain values already
    _OPTIONS = {}

INTERPOLATION = re.compile(r"^\$\{(.*)\}$", re.DOTALL)


def expression(value: Any) -> Any:
    """`${var.x}` -> `var.x`: the bare expression of a value that is one whole interpolation."""
    if isinstance(value, str):
        match = INTERPOLATION.match(value)
        if match:
            return match.group(1)
    return value


def _unquote(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


@dataclass
class Configuration:
    """Every top-level block of a Terraform directory, indexed by kind and name."""

    files: dict[str, str] = field(default_factory=dict)
    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    terraform: list[dict[str, Any]] = field(default_factory=list)

    def resource(self, kind: str, name: str) -> dict[str, Any]:
        return self.resources[(kind, name)]

    def resources_of(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: body for (k, name), body in self.resources.items() if k == kind}

    def local(self, reference: Any) -> Any:
        """The value of `local.NAME` (given as `${local.NAME}` or `local.NAME`)."""
        name = str(expression(reference)).removeprefix("local.")
        return self.locals[name]


def load(directory: Path) -> Configuration:
    config = Configuration()
    for path in sorted(directory.glob("*.tf")):
        text = path.read_text()
        config.files[path.name] = text
        parsed = hcl2.loads(text, **_OPTIONS)
        for block in parsed.get("resource", []):
            for kind, named in block.items():
                for name, body in named.items():
                    config.resources[(_unquote(kind), _unquote(name))] = body
        for block in parsed.get("data", []):
            for kind, named in block.items():
                for name, body in named.items():
                    config.data[(_unquote(kind), _unquote(name))] = body
        for kind, target in (
            ("module", config.modules),
            ("variable", config.variables),
            ("output", config.outputs),
        ):
            for block in parsed.get(kind, []):
                target.update({_unquote(name): body for name, body in block.items()})
        for block in parsed.get("locals", []):
            config.locals.update(block)
        config.terraform.extend(parsed.get("terraform", []))
    return config
