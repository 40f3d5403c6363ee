"""YAML read with each key's line; `${VAR}` and `${VAR:-default}` come from the environment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, at a key path."""

    path: Path
    message: str


@dataclass
class YamlDocument:
    """Plain Python data plus the line (1-based) where each key path was written."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Keys copied from elsewhere (a provider's key taken from `defaults`): copy -> original.
    aliases: dict[Path, Path] = field(default_factory=dict)

    def origin_of(self, path: Path) -> Path:
        """Where `path` was written: a key inherited from `defaults` is reported there."""
        for end in range(len(path), 0, -1):
            original = self.aliases.get(path[:end])
            if original is not None:
                return original + path[end:]
        return path

    def line_of(self, path: Path) -> int:
        """The line of `path`, else of its nearest written ancestor (1 for the document)."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1


class YamlSyntaxError(Exception):
    """The text is not YAML at all; carries the line where the parser gave up."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false.

    YAML 1.1 also reads NO, on, yes, off as booleans, so a country code `NO` (Norway) or a
    provider code `ON` in a template or an answer rule would silently become false/true.
    """


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)\Z"), list("tTfF")
)


def substitute_env(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace `${VAR}` and `${VAR:-default}`; returns the text and the names that were unset."""
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is not None and (value != "" or default is None):
            return value
        if default is not None:
            return default
        missing.append(name)
        return ""

    return _ENV_REFERENCE.sub(replace, text), missing


def load_yaml(text: str, environ: Mapping[str, str]) -> YamlDocument:
    """Parse `text`; environment references are resolved inside string scalars only.

    Substituting after parsing means a value from the environment can never change the
    document's structure (a `:` or newline in a secret stays part of one string).
    """
    loader = _Yaml12Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        raise _syntax_error(error, text) from error
    finally:
        loader.dispose()
    document = YamlDocument(data=None)
    if root is not None:
        document.data = _build(root, (), loader, document, environ)
    return document


def _syntax_error(error: yaml.MarkedYAMLError, text: str) -> YamlSyntaxError:
    """The line the mistake is on: an unclosed quote or bracket is only noticed where the
    text ends, so the parser's problem mark is then the last line and its context mark (where
    the unclosed token began) is the one to report."""
    mark = error.problem_mark or error.context_mark
    at_end = mark is not None and not text[mark.index :].strip()
    if at_end and error.context_mark is not None:
        mark = error.context_mark
    message = f"{error.context}: {error.problem}" if error.context else str(error.problem)
    return YamlSyntaxError(mark.line + 1 if mark else 1, message)


def _build(
    node: yaml.Node,
    path: Path,
    loader: _Yaml12Loader,
    document: YamlDocument,
    environ: Mapping[str, str],
) -> Any:
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_path = (*path, str(key))
            if key in result:
                document.problems.append(Problem(key_path, "duplicate key"))
            document.lines[key_path] = key_node.start_mark.line + 1
            result[key] = _build(value_node, key_path, loader, document, environ)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item_node in enumerate(node.value):
            document.lines[(*path, index)] = item_node.start_mark.line + 1
            items.append(_build(item_node, (*path, index), loader, document, environ))
        return items
    value = loader.construct_object(node, deep=True)
    if isinstance(value, str):
        value, missing = substitute_env(value, environ)
        for name in missing:
            document.problems.append(
                Problem(path, f"environment variable {name} is not set and has no default")
            )
    return value
