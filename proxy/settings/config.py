"""The gateway's configuration: YAML loaded once at start-up into frozen, validated objects."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.providers.access_tokens import AuthSpec
from proxy.providers.callbacks import CallbackSpec, CallbackTarget
from proxy.providers.mapping import (
    BUSY_STATUSES,
    ProviderMapping,
    RequestSpec,
    ResponseSpec,
    StatusMapping,
    StatusSpec,
    compile_mapping,
    compile_status,
    http_url,
)
from proxy.settings.clients import (
    MIN_WEBHOOK_SECRET_CHARS,
    AuthMode,
    ClientSettings,
    client_problems,
)
from proxy.settings.redis_address import RedisAddress, check_pem_file, parse_redis_url
from proxy.settings.yaml_source import Path, Problem, YamlDocument, YamlSyntaxError, load_yaml

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
_PROVIDER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=1, le=65535)
    max_body_bytes: int = Field(16384, ge=256, le=10 * 1024 * 1024)
    # How long SIGTERM waits for in-flight payments before exiting (ECS stopTimeout must exceed it).
    shutdown_timeout_s: float = Field(20, gt=0, le=120)
    # A request's headers and body must be complete this long after its first byte (408).
    read_timeout_s: float = Field(10, gt=0, le=300)
    # An idle connection between requests is closed after this.
    keepalive_timeout_s: float = Field(15, gt=0, le=3600)
    # Open client connections per process; one more is accepted and closed at once.
    max_connections: int = Field(4096, ge=1, le=500_000)
    # The URL providers reach payagg at, for `{callback_url}`; unset: no callback URL is sent.
    public_url: str | None = None
    # Keys the callback URLs' tokens (HMAC-SHA256); needed once public_url is set.
    callback_secret: str | None = Field(None, repr=False)
    # production refuses `auth: off`.
    environment: Literal["development", "staging", "production"] = "development"
    # /metrics, /v1/providers, /openapi.json and the admin API (proxy/admin/); 0: no admin port.
    admin_port: int = Field(9090, ge=0, le=65535)

    @field_validator("public_url", "callback_secret")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        # `${PAYAGG_PUBLIC_URL:-}` renders "" when the variable is unset.
        return value or None

    @field_validator("public_url")
    @classmethod
    def _public_http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        return url.rstrip("/")

    @field_validator("callback_secret")
    @classmethod
    def _long_secret(cls, secret: str | None) -> str | None:
        if secret is not None and len(secret) < 16:
            raise ValueError(f"must be at least 16 characters, got {len(secret)}")
        return secret

    @model_validator(mode="after")
    def _admin_port_apart(self) -> ServerSettings:
        if self.admin_port == self.port:
            raise ValueError(
                f"admin_port must differ from port ({self.port}): the admin API is never served "
                "where payments are"
            )
        return self

    def callback_target(self) -> CallbackTarget | None:
        if self.public_url is None or self.callback_secret is None:
            return None
        return CallbackTarget(self.public_url, self.callback_secret)


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    # cluster: Redis Cluster (ElastiCache cluster mode, MemoryDB); the URL names any one node.
    mode: Literal["standalone", "cluster"] = "standalone"
    key_prefix: str = "payagg:"
    # Every Redis call is bounded by this, so a hung Redis cannot hang a payment.
    timeout_s: float = Field(0.5, gt=0, le=10)
    # PEM files for rediss://: the authority the server's certificate must chain to (else the
    # system's), and a client certificate with its key when the server asks for one.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # A charged payment's answer is written again for this long while Redis cannot take it.
    durable_retry_s: float = Field(10, ge=0, le=300)
    # Replicas that must hold a charged payment's answer before the client sees it (WAIT).
    wait_replicas: int = Field(0, ge=0, le=5)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        parse_redis_url(url)
        return url

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _pem_file(cls, path: str | None) -> str | None:
        if path is not None:
            check_pem_file(path)
        return path

    @model_validator(mode="after")
    def _consistent(self) -> RedisSettings:
        address = self.address
        tls_files = [self.tls_ca_file, self.tls_cert_file, self.tls_key_file]
        if not address.tls and any(tls_files):
            raise ValueError("tls_ca_file, tls_cert_file and tls_key_file need a rediss:// url")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.mode == "cluster" and address.db != 0:
            raise ValueError(f"Redis Cluster has only database 0, the url selects {address.db}")
        return self

    @property
    def address(self) -> RedisAddress:
        return parse_redis_url(self.url)


class IdempotencySettings(_Section):
    lock_ttl_s: int = Field(30, gt=0)
    result_ttl_s: int = Field(86400, gt=0)
    # After result_ttl_s a compact tombstone per TransactionID refuses a reuse with another
    # provider or amount (422) for this long: "never charged twice" does not end after a day.
    tombstone_ttl_s: int = Field(90 * 86400, gt=0)
    # Deprecated and ignored (the per-process replay cache is gone): accepted, with a warning at
    # start-up, so a config written for an earlier version still starts.
    replay_cache_size: int | None = None


class WebhookSettings(_Section):
    """Merchant webhooks: where final states are POSTed, signed, and for how long retried."""

    # Empty: no webhook is sent, and none is enqueued (the outbox would only grow).
    url: str = ""
    # The HMAC-SHA256 key of Payagg-Signature; from the environment, never written in the file.
    secret: str = Field("", repr=False)
    # A delivery still failing this long after its payment became final is dropped (logged).
    retry_for_s: float = Field(86400, ge=1, le=30 * 86400)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if url and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        return url


class ReconcileSettings(_Section):
    """How the reconciler asks providers about payments not final yet."""

    # Polls back off from 1 s, doubling, up to this.
    max_interval_s: float = Field(60, ge=1, le=3600)
    # Not final after this: UNRESOLVED (never guessed; still changed by a late report).
    give_up_after_s: float = Field(86400, gt=0)


class BreakerSettings(_Section):
    failure_rate_threshold: float = Field(0.6, gt=0, le=1)
    minimum_calls: int = 3
    window_s: float = Field(5, gt=0)
    open_s: float = Field(30, gt=0)
    half_open_max_calls: int = 1
    # 4xx answers (no response rule matched) that count as failures, like a 5xx.
    failure_statuses: list[int] = Field(default_factory=lambda: list(BUSY_STATUSES))


class TlsFileError(Exception):
    """A `tls` file that cannot be used; `key` names the setting (ca_file, cert_file)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


class TlsSettings(_Section):
    """Per-provider TLS: a private CA to trust instead of the system's, a client certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None  # omitted when cert_file holds the key too

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable_file(cls, path: str | None) -> str | None:
        if path is not None and not os.access(path, os.R_OK):
            reason = "is not readable" if os.path.exists(path) else "does not exist"
            raise ValueError(f"{path!r} {reason}")
        return path

    def context(self) -> ssl.SSLContext:
        """A verifying client context; raises TlsFileError naming the key of an unusable file."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (ssl.SSLError, OSError) as error:
            raise TlsFileError("ca_file", f"holds no usable CA certificate: {error}") from error
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, OSError) as error:
                raise TlsFileError(
                    "cert_file", f"no usable certificate and private key: {error}"
                ) from error
        return context


class ProviderSettings(_Section):
    url: str
    timeout_s: float = Field(5, gt=0, le=300)
    # Each bounded on its own, and all within timeout_s (a longer one is cut to it).
    connect_timeout_s: float = Field(3, gt=0, le=300)
    pool_wait_s: float = Field(1, gt=0, le=300)
    pool_size: int = Field(256, ge=1, le=100_000)
    # Idle keep-alive connections older than this are closed, never reused: a connection a NAT or
    # load balancer dropped silently would otherwise cost a whole timeout.
    keepalive_expiry_s: float = Field(15, gt=0, le=3600)
    tls: TlsSettings | None = None
    breaker: BreakerSettings = BreakerSettings()
    # Used for {payer} when a payment carries no `Payer` (the original service sent none).
    default_payer: str | None = Field(None, pattern=r"^[0-9]{8,15}$")
    request: RequestSpec | None = None
    response: ResponseSpec | None = None
    # How to obtain an access token, rendered by {token}.
    auth: AuthSpec | None = None
    # How to ask for a payment's state; the canonical protocol's `GET {url}/{reference}` when
    # neither request nor response is given.
    status: StatusSpec | None = None
    callback: CallbackSpec | None = None
    # How long POST /v1/pay waits for a pending payment to become final.
    sync_wait_s: float = Field(10, ge=0, le=300)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return http_url(url)


class ProviderDefaults(_Section):
    """Keys applied to every provider unless it sets them; checked as part of each provider."""

    timeout_s: Any = None
    connect_timeout_s: Any = None
    pool_wait_s: Any = None
    pool_size: Any = None
    keepalive_expiry_s: Any = None
    breaker: Any = None
    default_payer: Any = None
    request: Any = None
    response: Any = None
    sync_wait_s: Any = None


class _FileShape(_Section):
    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    webhooks: WebhookSettings = WebhookSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    defaults: ProviderDefaults = ProviderDefaults()
    # Each provider is validated on its own, so one bad provider hides no other's problems.
    providers: dict[str, Any]
    auth: AuthMode = "off"
    clients: list[ClientSettings] = Field(default_factory=list)

    @field_validator("providers")
    @classmethod
    def _at_least_one(cls, providers: dict[str, Any]) -> dict[str, Any]:
        if not providers:
            raise ValueError("declares no provider; at least one is needed")
        return providers


@dataclass(frozen=True)
class Provider:
    """A configured provider, ready to serve: its settings and its compiled mapping."""

    name: str
    settings: ProviderSettings
    mapping: ProviderMapping
    # None: the provider cannot be asked for a payment's state.
    status: StatusMapping | None = None
    # None: no `server.public_url`, so no callback URL is sent.
    callbacks: CallbackTarget | None = None

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def host(self) -> str:
        """`host[:port]` of the URL, never its user:password (the Host header, /v1/providers)."""
        parts = urlsplit(self.settings.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{parts.port}" if parts.port else host

    @property
    def static_callback_url(self) -> str | None:
        """The one URL to register at a provider that names the payment in its callback's body
        (`callback.reference`, Airtel); None for the others, or without `server.public_url`."""
        callback = self.settings.callback
        if self.callbacks is None or callback is None or callback.reference is None:
            return None
        return self.callbacks.static_url_for(self.name)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway reads from its YAML file; nothing reads the raw YAML afterwards."""

    source: str
    server: ServerSettings
    redis: RedisSettings
    idempotency: IdempotencySettings
    providers: tuple[Provider, ...]
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    # SHA-256 of the file's text as read, before ${VAR} substitution: which file a process runs.
    content_sha256: str = ""
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    auth: AuthMode = "off"
    clients: tuple[ClientSettings, ...] = ()

    def summary(self) -> str:
        names = ", ".join(provider.name for provider in self.providers)
        return f"{self.source}: OK, {len(self.providers)} provider(s): {names}"


class ConfigError(Exception):
    """A config file that cannot be used; `problems` holds every `file:line: key: problem`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Read, validate and compile a config file, reporting every problem at once."""
    source = str(path)
    try:
        text = FilePath(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{source}: cannot read: {error.strerror or error}"]) from error
    return parse_config(text, source, os.environ if environ is None else environ)


def parse_config(text: str, source: str, environ: Mapping[str, str]) -> GatewayConfig:
    try:
        document = load_yaml(text, environ)
    except YamlSyntaxError as error:
        raise ConfigError([f"{source}:{error.line}: not valid YAML: {error.message}"]) from error
    problems = list(document.problems)
    if not isinstance(document.data, dict):
        raise ConfigError([f"{source}:1: the file must be a mapping with a `providers` key"])
    raw = _merge_defaults(document)
    shape: _FileShape | None = None
    try:
        shape = _FileShape.model_validate(raw)
    except ValidationError as error:
        problems.extend(_problems_from_pydantic(error, ()))
    providers_raw = raw.get("providers")
    settings: dict[str, ProviderSettings] = {}
    if isinstance(providers_raw, dict):
        for name, provider_raw in providers_raw.items():
            try:
                settings[str(name)] = ProviderSettings.model_validate(provider_raw)
            except ValidationError as error:
                problems.extend(_problems_from_pydantic(error, ("providers", str(name))))
    server = shape.server if shape is not None else ServerSettings()
    providers, provider_problems = _build_providers(settings, server)
    problems.extend(provider_problems)
    problems.extend(client_problems(raw, settings))
    idempotency = shape.idempotency if shape is not None else _idempotency_alone(raw)
    if idempotency is not None:
        problems.extend(_lock_ttl_problems(idempotency, settings))
    if shape is not None:
        problems.extend(_webhook_problems(shape.webhooks))
    if problems or shape is None:
        raise ConfigError(_format(problems, document, source))
    return GatewayConfig(
        source,
        shape.server,
        shape.redis,
        shape.idempotency,
        providers,
        reconcile=shape.reconcile,
        content_sha256=hashlib.sha256(text.encode()).hexdigest(),
        webhooks=shape.webhooks,
        auth=shape.auth,
        clients=tuple(shape.clients),
    )


def _merge_defaults(document: YamlDocument) -> dict[str, Any]:
    """Each provider gets `defaults` under its own keys; merged keys keep the defaults' lines."""
    raw: dict[str, Any] = dict(document.data)
    defaults = raw.get("defaults")
    providers = raw.get("providers")
    if not isinstance(defaults, dict) or not isinstance(providers, dict):
        return raw
    merged = {}
    for name, settings in providers.items():
        if isinstance(settings, dict):
            settings = _deep_merge(
                defaults, settings, ("defaults",), ("providers", str(name)), document
            )
        merged[name] = settings
    raw["providers"] = merged
    return raw


def _deep_merge(
    base: dict[str, Any],
    override: dict[str, Any],
    base_path: Path,
    path: Path,
    document: YamlDocument,
) -> dict[str, Any]:
    result = dict(override)
    for key, value in base.items():
        key_path, base_key_path = (*path, str(key)), (*base_path, str(key))
        if key not in override:
            result[key] = value
            document.aliases[key_path] = base_key_path
        elif isinstance(value, dict) and isinstance(override[key], dict):
            result[key] = _deep_merge(value, override[key], base_key_path, key_path, document)
    return result


def _problems_from_pydantic(error: ValidationError, prefix: Path) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        path: Path = (*prefix, *(part for part in item["loc"] if not _is_union_tag(part)))
        problems.append(Problem(path, _describe(item, path)))
    return problems


def _is_union_tag(part: str | int) -> bool:
    # pydantic adds the tried type to the location of union members ("int", "list[...]").
    return isinstance(part, str) and ("[" in part or part in ("int", "str", "bool", "float"))


def _describe(item: Any, path: Path) -> str:
    kind, context = item["type"], item.get("ctx", {})
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(path)
    if kind == "missing":
        return "required key is missing"
    got = f", got {item['input']!r}"
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(context.values()))
        return f"must be {bounds[kind]} {limit:g}{got}"
    if kind == "value_error":
        return str(context.get("error", item["msg"]))
    if kind == "string_pattern_mismatch":
        return f"must match {context['pattern']}{got}"
    return f"{item['msg'][0].lower()}{item['msg'][1:]}{got}"


def _did_you_mean(path: Path) -> str:
    model = _model_at(path[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(str(path[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(path: Path) -> type[BaseModel] | None:
    model: type[BaseModel] = _FileShape
    position = 0
    while position < len(path):
        part = path[position]
        if isinstance(part, int):  # an item of a list of sections (`clients`)
            position += 1
            continue
        if model is _FileShape and part == "providers":
            model, position = ProviderSettings, position + 2
            continue
        annotation = model.model_fields.get(str(part))
        target = annotation.annotation if annotation else None
        candidates = [t for t in getattr(target, "__args__", (target,)) if isinstance(t, type)]
        nested = [t for t in candidates if issubclass(t, BaseModel)]
        if not nested:
            return None
        model, position = nested[0], position + 1
    return model


def _build_providers(
    all_settings: dict[str, ProviderSettings], server: ServerSettings
) -> tuple[tuple[Provider, ...], list[Problem]]:
    problems: list[Problem] = []
    providers = []
    seen: dict[str, str] = {}
    for name, settings in all_settings.items():
        path: Path = ("providers", name)
        if not _PROVIDER_NAME.fullmatch(name) or name.lower() == "unknown":
            problems.append(
                Problem(
                    path,
                    "a provider name is 1-32 letters, digits, _ or -, starting with a letter"
                    " (and not 'unknown', the metrics label for unmatched requests)",
                )
            )
        if name.lower() in seen:
            problems.append(
                Problem(
                    path, f"same name as {seen[name.lower()]!r}: ProviderKey is case-insensitive"
                )
            )
        seen[name.lower()] = name
        mapping, mapping_problems = compile_mapping(
            settings.request,
            settings.response,
            settings.default_payer is not None,
            path,
            settings.breaker.failure_statuses,
        )
        problems.extend(mapping_problems)
        canonical = settings.request is None and settings.response is None
        status, status_problems = compile_status(
            settings.status, settings.url if canonical else None, path
        )
        problems.extend(status_problems)
        problems.extend(_protocol_problems(settings, mapping, status, server, path))
        problems.extend(_breaker_problems(settings.breaker, (*path, "breaker")))
        problems.extend(_tls_problems(settings, (*path, "tls")))
        providers.append(Provider(name, settings, mapping, status, server.callback_target()))
    return tuple(providers), problems


def _protocol_problems(
    settings: ProviderSettings,
    mapping: ProviderMapping,
    status: StatusMapping | None,
    server: ServerSettings,
    path: Path,
) -> list[Problem]:
    """How tokens, pending answers, status queries and callbacks fit together."""
    problems = []
    uses = mapping.names_used | (status.names_used if status is not None else frozenset())
    if "token" in uses and settings.auth is None:
        problems.append(Problem(path, "a template uses {token} but `auth:` says how to get none"))
    if settings.auth is not None and "token" not in uses:
        problems.append(Problem((*path, "auth"), "no request or status template sends the {token}"))
    if status is None and (settings.response is not None and settings.response.pending):
        problems.append(
            Problem(
                (*path, "response", "pending"),
                "a pending payment needs a `status:` query to learn its outcome",
            )
        )
    if settings.callback is not None:
        problems.extend(settings.callback.problems((*path, "callback")))
        if status is None:
            problems.append(
                Problem(
                    (*path, "callback"),
                    "a callback is only a hint to query the status: it needs `status:`",
                )
            )
    static = settings.callback is not None and settings.callback.reference is not None
    if (
        ("callback_url" in mapping.names_used or static)
        and server.public_url is not None
        and server.callback_secret is None
    ):
        problems.append(
            Problem(
                ("server", "callback_secret"),
                "is required once server.public_url is set and a provider sends {callback_url}"
                " or has a static callback URL (`callback.reference`)",
            )
        )
    return problems


def _breaker_problems(breaker: BreakerSettings, path: Path) -> list[Problem]:
    problems = [
        Problem(
            (*path, "failure_statuses", index),
            f"must be a 4xx status (every 5xx counts as a failure already), got {status}",
        )
        for index, status in enumerate(breaker.failure_statuses)
        if not 400 <= status <= 499
    ]
    if breaker.minimum_calls < 1:
        problems.append(
            Problem(
                (*path, "minimum_calls"),
                f"must be >= 1, got {breaker.minimum_calls}: with no minimum, a single failed "
                "call in a quiet window is a 100% failure rate and opens the breaker",
            )
        )
    if breaker.half_open_max_calls < 1:
        problems.append(
            Problem(
                (*path, "half_open_max_calls"),
                f"must be >= 1, got {breaker.half_open_max_calls}: with no trial call a "
                "breaker that opened could never close again",
            )
        )
    elif breaker.half_open_max_calls > max(breaker.minimum_calls, 1):
        problems.append(
            Problem(
                (*path, "half_open_max_calls"),
                f"must be <= minimum_calls ({breaker.minimum_calls}), got "
                f"{breaker.half_open_max_calls}: more trial calls than it takes to judge a "
                "provider would send a still-failing provider a burst instead of a probe",
            )
        )
    return problems


def _tls_problems(settings: ProviderSettings, path: Path) -> list[Problem]:
    tls = settings.tls
    if tls is None:
        return []
    if urlsplit(settings.url).scheme != "https":
        return [Problem(path, f"applies to https:// URLs only, but url is {settings.url!r}")]
    if tls.key_file is not None and tls.cert_file is None:
        return [Problem((*path, "key_file"), "needs `cert_file`: the certificate it belongs to")]
    try:
        tls.context()
    except TlsFileError as error:
        return [Problem((*path, error.key), error.problem)]
    return []


def _idempotency_alone(raw: dict[str, Any]) -> IdempotencySettings | None:
    """The `idempotency` section when another section is invalid, so its rule is checked too."""
    try:
        return IdempotencySettings.model_validate(raw.get("idempotency") or {})
    except ValidationError:
        return None  # its own problems are already reported by the whole file's validation


def _lock_ttl_problems(
    idempotency: IdempotencySettings, settings: dict[str, ProviderSettings]
) -> list[Problem]:
    if not settings:
        return []
    slowest = max(settings, key=lambda name: settings[name].timeout_s)
    timeout_s = settings[slowest].timeout_s
    if idempotency.lock_ttl_s > timeout_s:
        return []
    return [
        Problem(
            ("idempotency", "lock_ttl_s"),
            f"must exceed the largest provider timeout ({slowest}: timeout_s {timeout_s:g}), "
            f"got {idempotency.lock_ttl_s}: a lock that expires while the provider still "
            "works lets a retry charge twice",
        )
    ]


def _webhook_problems(webhooks: WebhookSettings) -> list[Problem]:
    if not webhooks.url:
        return []
    if not webhooks.secret:
        return [
            Problem(
                ("webhooks", "secret"),
                "required when webhooks.url is set (${PAYAGG_WEBHOOK_SECRET}): receivers "
                "could not tell payagg's webhooks from forged ones",
            )
        ]
    if len(webhooks.secret) < MIN_WEBHOOK_SECRET_CHARS:
        return [
            Problem(
                ("webhooks", "secret"),
                f"must be at least {MIN_WEBHOOK_SECRET_CHARS} characters, got "
                f"{len(webhooks.secret)}: a short key can be guessed from one signed webhook",
            )
        ]
    return []


def _format(problems: list[Problem], document: YamlDocument, source: str) -> list[str]:
    """`file:line: key: problem`, in line order; a problem inherited from `defaults` once."""
    located: dict[str, int] = {}
    for problem in problems:
        path = document.origin_of(problem.path)
        line = document.line_of(path)
        key = ".".join(str(part) for part in path) or "(file)"
        located.setdefault(f"{source}:{line}: {key}: {problem.message}", line)
    return sorted(located, key=lambda text: located[text])
