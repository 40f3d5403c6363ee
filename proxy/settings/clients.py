"""The `clients:` and `auth:` sections: who may call the payment API, with which keys, how often.

A client's keys are never written in the file: only their SHA-256 hashes, which usually come
from the environment (`${PAYAGG_MERCHANT_KEY_SHA256}`), filled from Secrets Manager in AWS.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proxy.observability.labels import OPEN_CLIENT, UNKNOWN_CLIENT
from proxy.settings.yaml_source import Path, Problem

AuthMode = Literal["required", "off"]
_CLIENT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_KEY_HASH = re.compile(r"[0-9a-f]{64}")
# One entry may carry several hashes (one secret holding the old and the new key mid-rotation).
_HASH_SEPARATORS = re.compile(r"[\s,]+")
# HMAC keys shorter than this can be found offline from a single signed webhook.
MIN_WEBHOOK_SECRET_CHARS = 16


class ClientWebhook(BaseModel):
    """Where this client's payments' final states are POSTed, and the key that signs them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    secret: str = Field(repr=False)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        return url

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, secret: str) -> str:
        if len(secret) < MIN_WEBHOOK_SECRET_CHARS:
            raise ValueError(
                f"must be at least {MIN_WEBHOOK_SECRET_CHARS} characters, got {len(secret)}: "
                "a short key can be guessed from one signed webhook"
            )
        return secret


class ClientSettings(BaseModel):
    """One client of the payment API (a merchant, or one of its systems)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Its identity: the `client` label, the record's `client` field, the scope of its
    # TransactionIDs. Renaming a client starts a new set of payments.
    name: str
    # SHA-256 (64 lowercase hex) of each API key it may present; two during a rotation.
    key_sha256: list[str] = Field(default_factory=list)
    # The providers it may pay with (403 forbidden for the others).
    providers: list[str] = Field(min_length=1)
    # GCRA: `rate_per_s` on average, up to `burst` at once, across every process and task.
    rate_per_s: float = Field(gt=0, le=100_000)
    burst: int = Field(ge=1, le=1_000_000)
    # None: the top-level `webhooks:` target, when it has one.
    webhook: ClientWebhook | None = None
    # Its payments share the records and provider references of the open API (`auth: off`):
    # the merchant that used payagg before keys existed keeps its payments, and a retry of one
    # made before is never charged again under a new reference.
    owns_open_payments: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _CLIENT_NAME.fullmatch(name) or name in (OPEN_CLIENT, UNKNOWN_CLIENT):
            raise ValueError(
                "must be 1-32 lowercase letters, digits, _ or -, starting with a letter, and "
                f"not {OPEN_CLIENT!r} or {UNKNOWN_CLIENT!r} (the labels of requests without a "
                f"client), got {name!r}"
            )
        return name

    @property
    def key_hashes(self) -> tuple[str, ...]:
        return tuple(hashes_in(self.key_sha256))


def hashes_in(entries: Iterable[str]) -> list[str]:
    """Every hash the entries hold; an entry may list several, separated by commas or spaces."""
    return [part for entry in entries for part in _HASH_SEPARATORS.split(entry) if part]


def client_problems(raw: Mapping[str, Any], providers: Iterable[str]) -> list[Problem]:
    """What the clients say together, with `auth:` and the providers.

    Read from the raw file, each client validated on its own, so that these problems are
    reported with those of any other section (each client's own fields are reported there).
    """
    auth = raw.get("auth", "off")
    server = raw.get("server")
    environment = server.get("environment") if isinstance(server, dict) else None
    raw_clients = raw.get("clients")
    clients: list[ClientSettings | None] = []
    for item in raw_clients if isinstance(raw_clients, list) else []:
        try:
            clients.append(ClientSettings.model_validate(item))
        except ValidationError:
            clients.append(None)
    problems: list[Problem] = []
    if auth == "off" and environment == "production":
        problems.append(
            Problem(
                ("auth",),
                "must be `required` when server.environment is production: `off` lets anyone "
                "who reaches the proxy start payments and read them",
            )
        )
    if auth == "required" and not clients:
        problems.append(Problem(("auth",), "`required` needs at least one entry in `clients:`"))
    known = {name.lower(): name for name in providers}
    names: dict[str, int] = {}
    owners: list[int] = []
    hashes: dict[str, str] = {}
    for index, client in enumerate(clients):
        if client is None:
            continue
        path: Path = ("clients", index)
        if client.name in names:
            problems.append(
                Problem((*path, "name"), f"{client.name!r} is also client {names[client.name]}")
            )
        names.setdefault(client.name, index)
        if client.owns_open_payments:
            owners.append(index)
        problems.extend(_key_problems(client, path, auth, hashes))
        for position, provider in enumerate(client.providers):
            if provider.lower() not in known:
                problems.append(
                    Problem(
                        (*path, "providers", position),
                        f"no provider named {provider!r} is configured",
                    )
                )
    for index in owners[1:]:
        problems.append(
            Problem(
                ("clients", index, "owns_open_payments"),
                f"client {owners[0]} owns the open API's payments already: only one may",
            )
        )
    return problems


def _key_problems(
    client: ClientSettings, path: Path, auth: object, seen: dict[str, str]
) -> list[Problem]:
    problems = []
    if auth == "required" and not client.key_hashes:
        problems.append(
            Problem(
                (*path, "key_sha256"),
                "no key hash: with `auth: required` a client needs one (is its environment "
                "variable empty?)",
            )
        )
    for position, entry in enumerate(client.key_sha256):
        for digest in hashes_in([entry]):
            where: Path = (*path, "key_sha256", position)
            if not _KEY_HASH.fullmatch(digest):
                problems.append(
                    Problem(
                        where,
                        "must be a SHA-256 as 64 lowercase hex digits (the key's hash, never "
                        f"the key), got {_described(digest)}",
                    )
                )
            elif digest in seen:
                problems.append(
                    Problem(
                        where, f"the same key hash as client {seen[digest]!r}: one key, one client"
                    )
                )
            else:
                seen[digest] = client.name
    return problems


def _described(text: str) -> str:
    """A wrong hash described without quoting it: it may be the key itself, pasted by mistake."""
    if len(text) == 64:
        return "64 characters, not all lowercase hex"
    return f"{len(text)} character(s)"
