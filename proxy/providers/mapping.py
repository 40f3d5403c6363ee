"""The provider mapping language: a payment rendered as a provider's request, its answer read.

Templates are parsed once at start-up into small render trees; a request renders without any
string parsing. Placeholders are `{name}` or `{name:format}`; `{{` and `}}` are literal braces.
A string that is exactly one placeholder keeps the value's JSON type (an amount stays a number).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.providers.classification import BUSY_STATUSES as BUSY_STATUSES  # the config's default
from proxy.providers.classification import AnswerOutcome, unmatched
from proxy.settings.yaml_source import Path, Problem

JsonValue = Any


@dataclass(frozen=True, slots=True)
class PaymentFields:
    """What a template may name: the payment plus the identities the gateway derives."""

    transaction_id: str
    amount: Decimal
    currency: str
    payer: str | None
    reference: str
    idempotency_key: str
    provider: str
    # Known only when the request goes out: the provider's access token (never logged), payagg's
    # callback URL for this payment ("" when none), and the provider's own id (status requests).
    token: str = ""
    callback_url: str = ""
    provider_reference: str = ""


def _amount_number(fields: PaymentFields) -> JsonValue:
    return (
        int(fields.amount) if fields.amount == fields.amount.to_integral() else float(fields.amount)
    )


def _amount_decimal2(fields: PaymentFields) -> JsonValue:
    return f"{fields.amount:.2f}"


def _amount_minor(fields: PaymentFields) -> JsonValue:
    return int(fields.amount * 100)


# (placeholder, format) -> how to read it; format "" is the default.
_GETTERS: dict[tuple[str, str], Callable[[PaymentFields], JsonValue]] = {
    ("transaction_id", ""): lambda f: f.transaction_id,
    ("currency", ""): lambda f: f.currency,
    ("payer", ""): lambda f: f.payer,
    ("reference", ""): lambda f: f.reference,
    ("idempotency_key", ""): lambda f: f.idempotency_key,
    ("provider", ""): lambda f: f.provider,
    ("token", ""): lambda f: f.token,
    ("callback_url", ""): lambda f: f.callback_url,
    ("provider_reference", ""): lambda f: f.provider_reference,
    ("amount", ""): _amount_number,
    ("amount", "number"): _amount_number,
    ("amount", "decimal2"): _amount_decimal2,
    ("amount", "minor_units"): _amount_minor,
}
PLACEHOLDERS = sorted({name for name, _ in _GETTERS})
# A payment request knows no provider id yet; a status request knows no payment, only its ids.
PAYMENT_PLACEHOLDERS = frozenset(PLACEHOLDERS) - {"provider_reference"}
STATUS_PLACEHOLDERS = frozenset({"reference", "provider_reference", "token", "provider"})
_PLACEHOLDER_OF = {getter: name for (name, _), getter in _GETTERS.items()}
# The request field each placeholder reads, named in the 400 when its value cannot be sent in a
# header; {reference} and {provider} are payagg's own (a UUID, a configured name).
_REQUEST_FIELDS = {
    "transaction_id": "TransactionID",
    "amount": "Amount",
    "currency": "Currency",
    "payer": "Payer",
    "idempotency_key": "Idempotency-Key",
}
# A CR or LF in a header value ends the header line early, so the rest of the value becomes
# headers (or a second request) of its own; parsers refuse a NUL.
_UNSAFE_IN_HEADER = re.compile(r"[\r\n\x00]")
_CONTROL_NAMES = {"\r": "a carriage return (CR)", "\n": "a line feed (LF)", "\x00": "a NUL"}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
# payagg writes these itself from `url` and the rendered body: a second one would misframe it.
_RESERVED_HEADERS = ("Host", "Content-Length", "Transfer-Encoding", "Connection")
_RESERVED_LOWER = frozenset(name.lower() for name in _RESERVED_HEADERS)
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class Part:
    """A compiled piece of a template."""

    def render(self, fields: PaymentFields) -> JsonValue:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Constant(Part):
    value: JsonValue

    def render(self, fields: PaymentFields) -> JsonValue:
        return self.value


@dataclass(frozen=True, slots=True)
class Placeholder(Part):
    getter: Callable[[PaymentFields], JsonValue]

    def render(self, fields: PaymentFields) -> JsonValue:
        return self.getter(fields)


@dataclass(frozen=True, slots=True)
class Text(Part):
    """A string mixing literal text and placeholders; every piece is rendered as text."""

    pieces: tuple[str | Callable[[PaymentFields], JsonValue], ...]

    def render(self, fields: PaymentFields) -> JsonValue:
        out = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
            else:
                out.append(str(piece(fields)))
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Object(Part):
    items: tuple[tuple[str, Part], ...]

    def render(self, fields: PaymentFields) -> JsonValue:
        return {key: part.render(fields) for key, part in self.items}


@dataclass(frozen=True, slots=True)
class Array(Part):
    items: tuple[Part, ...]

    def render(self, fields: PaymentFields) -> JsonValue:
        return [part.render(fields) for part in self.items]


class TemplateCompiler:
    """Compiles template values, collecting every problem with its key path."""

    def __init__(self, allowed: frozenset[str] = PAYMENT_PLACEHOLDERS) -> None:
        self.problems: list[Problem] = []
        self.names_used: set[str] = set()
        self._allowed = allowed

    def compile(self, value: JsonValue, path: Path) -> Part:
        if isinstance(value, dict):
            return Object(
                tuple((str(k), self.compile(v, (*path, str(k)))) for k, v in value.items())
            )
        if isinstance(value, list):
            return Array(tuple(self.compile(v, (*path, i)) for i, v in enumerate(value)))
        if isinstance(value, str):
            return self._compile_string(value, path)
        return Constant(value)

    def _compile_string(self, text: str, path: Path) -> Part:
        pieces: list[str | Callable[[PaymentFields], JsonValue]] = []
        position = 0
        for match in _TOKEN.finditer(text):
            if match.start() > position:
                pieces.append(text[position : match.start()])
            position = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                pieces.append(token[0])
            elif token in ("{", "}"):
                self.problems.append(
                    Problem(
                        path, f"unbalanced '{token}' in {text!r} (write {token * 2} for a literal)"
                    )
                )
            else:
                getter = self._getter(match.group(1), path)
                if getter is not None:
                    pieces.append(getter)
        if position < len(text):
            pieces.append(text[position:])
        if len(pieces) == 1 and callable(pieces[0]):
            return Placeholder(pieces[0])
        if all(isinstance(piece, str) for piece in pieces):
            return Constant("".join(str(piece) for piece in pieces))
        # Inside text an amount reads as money ("20.00"), never as a bare float.
        return Text(tuple(_amount_decimal2 if p is _amount_number else p for p in pieces))

    def _getter(self, spec: str, path: Path) -> Callable[[PaymentFields], JsonValue] | None:
        name, _, fmt = spec.strip().partition(":")
        getter = _GETTERS.get((name, fmt))
        if getter is None:
            if name not in PLACEHOLDERS:
                known = ", ".join(sorted(self._allowed))
                self.problems.append(
                    Problem(path, f"unknown placeholder {{{name}}}; known: {known}")
                )
            else:
                formats = sorted(f for n, f in _GETTERS if n == name and f)
                allowed = ", ".join(formats) if formats else "none"
                self.problems.append(
                    Problem(path, f"unknown format {fmt!r} for {{{name}}}; formats: {allowed}")
                )
            return None
        if name not in self._allowed:
            known = ", ".join(sorted(self._allowed))
            self.problems.append(
                Problem(path, f"{{{name}}} cannot be used here; known here: {known}")
            )
            return None
        self.names_used.add(name)
        return getter


def http_url(url: str) -> str:
    """`url` when it is an http:// or https:// URL with a host; else a ValueError saying so."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
    return url


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestSpec(_Spec):
    """How to build the provider's request (YAML `request:`)."""

    method: Literal["POST", "PUT"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    body: JsonValue = None


class AnswerRule(_Spec):
    """One way an answer can look: an HTTP status (or `2xx`) and/or a JSON field's value."""

    status: int | str | list[int | str] | None = None
    field: str | None = None
    equals: str | int | bool | list[str | int | bool] | None = None


class AnswerPathsSpec(_Spec):
    """Where an answer says which payment it is about (shared by `response:` and `status:`)."""

    provider_reference: str | None = None
    reason: str | list[str] = Field(default_factory=list)
    # Where the answer says which amount and currency it is about; compared with the request.
    amount: str | None = None
    currency: str | None = None


class ResponseSpec(AnswerPathsSpec):
    """How to read the provider's answer (YAML `response:`); first matching rule wins."""

    success: list[AnswerRule] = Field(default_factory=list)
    declined: list[AnswerRule] = Field(default_factory=list)
    # The provider has the payment and it is not final (MTN's empty 202, Airtel's DP00800001006).
    pending: list[AnswerRule] = Field(default_factory=list)
    # The provider already holds a payment under this reference (MTN: 409 RESOURCE_ALREADY_EXIST).
    already_exists: list[AnswerRule] = Field(default_factory=list)


class StatusSpec(AnswerPathsSpec):
    """How to ask the provider for a payment's state (YAML `status:`); first matching rule wins.

    An answer that matches no rule leaves the payment pending: it never fails one.
    """

    method: Literal["GET", "POST"] = "GET"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    success: list[AnswerRule]
    declined: list[AnswerRule] = Field(default_factory=list)
    pending: list[AnswerRule] = Field(default_factory=list)
    not_found: list[AnswerRule] = Field(default_factory=list)
    # A "not found" this soon after the payment request proves nothing: the provider may not
    # have recorded it yet.
    not_found_grace_s: float = Field(0, ge=0, le=86400)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return http_url(url)


# payagg's own protocol, used by any provider that declares no request/response mapping.
CANONICAL_REQUEST = RequestSpec(
    headers={"X-Reference-Id": "{reference}"},
    body={
        "reference": "{reference}",
        "transaction_id": "{transaction_id}",
        "amount": "{amount}",
        "currency": "{currency}",
        "payer": "{payer}",
    },
)
CANONICAL_RESPONSE = ResponseSpec(
    success=[AnswerRule(status="2xx", field="status", equals="SUCCESS")],
    declined=[AnswerRule(status="2xx", field="status", equals="DECLINED")],
    already_exists=[AnswerRule(status=409)],
    pending=[AnswerRule(status="2xx", field="status", equals="PENDING")],
    provider_reference="provider_reference",
    reason="reason",
    amount="amount",
    currency="currency",
)
# Its status endpoint: `GET {url}/{reference}`, the same body as a payment's answer, or 404.
CANONICAL_STATUS_RULES = {
    "success": CANONICAL_RESPONSE.success,
    "declined": CANONICAL_RESPONSE.declined,
    "pending": CANONICAL_RESPONSE.pending,
    "not_found": [AnswerRule(status=404)],
    "provider_reference": "provider_reference",
    "reason": "reason",
    "amount": "amount",
    "currency": "currency",
}
# What an answer means (and which statuses are busy) is classification's to say.
Outcome = AnswerOutcome
_NO_VALUE = object()


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """A provider's answer as the gateway understands it (to a payment or a status query)."""

    outcome: Outcome
    provider_reference: str | None = None
    reason: str | None = None
    detail: str = ""
    # The amount and currency the answer says it is about, as sent (None: the answer, or the
    # mapping, has none). Only `contradicts()` reads them.
    amount: JsonValue = None
    currency: JsonValue = None

    def contradicts(self, amount: Decimal, currency: str) -> bool:
        """Whether the answer is about another payment than the request's.

        A value the answer does not carry says nothing; one it carries must be the request's
        exactly: the amount as a decimal ("20.00", "20", 20 and 20.0 are all 20), the currency
        as the same string. A value that cannot be read as either contradicts.
        """
        if self.amount is not None and _as_decimal(self.amount) != amount:
            return True
        return self.currency is not None and self.currency != currency


# A status query's answer: the same shape, outcome one of success, declined, pending, not_found.
StatusAnswer = ProviderAnswer
FINAL_OUTCOMES = frozenset({"success", "declined"})

_DECIMAL_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?")


def as_number(value: JsonValue) -> Decimal | None:
    """A JSON number, or a string holding one (Airtel's `expires_in` is "180"); else None."""
    return _as_decimal(value)


def _as_decimal(value: JsonValue) -> Decimal | None:
    # bool is an int in Python, and Decimal() alone would take " 20", "2_0", "NaN" and "2e1".
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        # repr is the shortest text that reads back as the same float ("20.1"); Decimal(20.1)
        # would be the float's exact binary value, 20.1000000000000014210854715...
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value):
        return Decimal(value)
    return None


def _normalise(value: JsonValue) -> str:
    """YAML and JSON scalars compare as text: `200` matches `"200"`, `true` matches true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _field_path(dotted: str) -> tuple[str | int, ...]:
    return tuple(int(part) if part.isdigit() else part for part in dotted.split("."))


def _lookup(document: JsonValue, path: tuple[str | int, ...]) -> JsonValue:
    for part in path:
        if isinstance(part, int) and isinstance(document, list) and part < len(document):
            document = document[part]
        elif isinstance(document, dict) and str(part) in document:
            document = document[str(part)]
        else:
            return _NO_VALUE
    return document


def lookup_path(document: JsonValue, dotted: str) -> JsonValue:
    """The value at a dotted path (`data.transaction.status`), None when absent."""
    value = _lookup(document, _field_path(dotted))
    return None if value is _NO_VALUE else value


@dataclass(frozen=True, slots=True)
class CompiledRule:
    statuses: frozenset[int]
    field: tuple[str | int, ...] | None
    values: frozenset[str]

    def matches(self, status: int, document: JsonValue) -> bool:
        if self.statuses and status not in self.statuses:
            return False
        if self.field is None:
            return True
        value = _lookup(document, self.field)
        return value is not _NO_VALUE and _normalise(value) in self.values


_STATUS_CLASS = re.compile(r"([1-5])xx")


def _compile_rule(rule: AnswerRule, path: Path, problems: list[Problem]) -> CompiledRule:
    statuses: set[int] = set()
    for index, status in enumerate(_as_list(rule.status)):
        status_class = _STATUS_CLASS.fullmatch(str(status))
        if isinstance(status, int) and 100 <= status <= 599:
            statuses.add(status)
        elif status_class:
            first = int(status_class.group(1)) * 100
            statuses.update(range(first, first + 100))
        else:
            where = (*path, "status") if rule.status == status else (*path, "status", index)
            problems.append(
                Problem(where, f"must be an HTTP status (100-599) or like 2xx, got {status!r}")
            )
    if rule.field is None and rule.equals is not None:
        problems.append(Problem((*path, "equals"), "needs `field`: the JSON field to compare"))
    if rule.field is not None and rule.equals is None:
        problems.append(Problem((*path, "field"), "needs `equals`: the value(s) that match"))
    if rule.field is None and not statuses:
        problems.append(Problem(path, "matches every answer; give a `status`, a `field`, or both"))
    return CompiledRule(
        statuses=frozenset(statuses),
        field=_field_path(rule.field) if rule.field else None,
        values=frozenset(_normalise(v) for v in _as_list(rule.equals)),
    )


@dataclass(frozen=True, slots=True)
class AnswerReader:
    """Where an answer says which payment it is about: the provider's id, reason, amount."""

    provider_reference: tuple[str | int, ...] | None
    reason: tuple[tuple[str | int, ...], ...]
    amount: tuple[str | int, ...] | None
    currency: tuple[str | int, ...] | None

    def read(self, outcome: Outcome, document: JsonValue, detail: str = "") -> ProviderAnswer:
        """An answer about a payment, with the amount and currency it names (if any)."""
        reference = _lookup(document, self.provider_reference or ())
        found = reference not in (_NO_VALUE, None) and self.provider_reference
        return ProviderAnswer(
            outcome,
            provider_reference=str(reference) if found and outcome == "success" else None,
            reason=self._reason(document) if outcome == "declined" else None,
            detail=detail,
            amount=self._echoed(self.amount, document),
            currency=self._echoed(self.currency, document),
        )

    @staticmethod
    def _echoed(path: tuple[str | int, ...] | None, document: JsonValue) -> JsonValue:
        if path is None:
            return None
        value = _lookup(document, path)
        return None if value is _NO_VALUE else value

    def _reason(self, document: JsonValue) -> str:
        for path in self.reason:
            value = _lookup(document, path)
            if value not in (_NO_VALUE, None, ""):
                return _normalise(value)
        return "DECLINED"


def _parse(raw: bytes) -> JsonValue:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return _NO_VALUE


def _unmatched(
    status: int, document: JsonValue, failure_statuses: frozenset[int]
) -> ProviderAnswer:
    """An answer no rule describes, as classification reads it."""
    outcome, detail = unmatched(status, document is not _NO_VALUE, failure_statuses)
    return ProviderAnswer(outcome, detail=detail)


@dataclass(frozen=True, slots=True)
class ProviderMapping:
    """A provider's compiled request template and answer rules."""

    method: str
    headers: tuple[tuple[str, Part], ...]
    body: Part
    success: tuple[CompiledRule, ...]
    declined: tuple[CompiledRule, ...]
    already_exists: tuple[CompiledRule, ...]
    reader: AnswerReader
    failure_statuses: frozenset[int]
    requires_payer: bool
    # (header, request field, getter) for each placeholder a header renders from the request.
    header_inputs: tuple[tuple[str, str, Callable[[PaymentFields], JsonValue]], ...] = ()
    pending: tuple[CompiledRule, ...] = ()
    names_used: frozenset[str] = frozenset()

    def render_headers(self, fields: PaymentFields) -> dict[str, str]:
        return _render_headers(self.headers, fields)

    def header_problems(self, fields: PaymentFields) -> dict[str, str]:
        """Each request field whose value would put CR, LF or NUL into a header, with why.

        Validation already refuses such values; this holds whatever the payment patterns allow.
        """
        return {
            field: f"cannot be sent in the {header} header: it contains CR, LF or NUL"
            for header, field, getter in self.header_inputs
            if _UNSAFE_IN_HEADER.search(str(getter(fields)))
        }

    def render_body(self, fields: PaymentFields) -> bytes:
        return json.dumps(self.body.render(fields), separators=(",", ":")).encode()

    def classify(self, status: int, raw: bytes) -> ProviderAnswer:
        """What an answer says, by the provider's rules; `classification` says what it means."""
        document = _parse(raw)
        for outcome, rules in (
            ("success", self.success),
            ("declined", self.declined),
            ("pending", self.pending),
        ):
            if any(rule.matches(status, document) for rule in rules):
                return self.reader.read(outcome, document)  # type: ignore[arg-type]
        if any(rule.matches(status, document) for rule in self.already_exists):
            return self.reader.read(
                "already_exists",
                document,
                detail=f"provider already holds this reference (HTTP {status})",
            )
        return _unmatched(status, document, self.failure_statuses)


@dataclass(frozen=True, slots=True)
class StatusMapping:
    """How to ask a provider for a payment's state, and how to read its answer."""

    method: str
    url: Part
    headers: tuple[tuple[str, Part], ...]
    rules: tuple[tuple[Outcome, tuple[CompiledRule, ...]], ...]
    reader: AnswerReader
    failure_statuses: frozenset[int]
    not_found_grace_s: float
    names_used: frozenset[str] = frozenset()

    def render_url(self, fields: PaymentFields) -> str:
        return str(self.url.render(fields))

    def render_headers(self, fields: PaymentFields) -> dict[str, str]:
        return _render_headers(self.headers, fields)

    def classify(self, status: int, raw: bytes) -> StatusAnswer:
        """success, declined, pending or not_found; or what a failed query says (failure,
        busy, rejected). A readable 2xx that no rule describes is pending, never final."""
        document = _parse(raw)
        for outcome, rules in self.rules:
            if any(rule.matches(status, document) for rule in rules):
                return self.reader.read(outcome, document)
        if 200 <= status < 300 and document is not _NO_VALUE:
            return ProviderAnswer("pending", detail=f"HTTP {status} matched no status rule")
        return _unmatched(status, document, self.failure_statuses)


def _render_headers(headers: tuple[tuple[str, Part], ...], fields: PaymentFields) -> dict[str, str]:
    # A header whose value renders empty (a {callback_url} with no public URL) is not sent.
    rendered = ((name, str(part.render(fields))) for name, part in headers)
    return {name: value for name, value in rendered if value}


def _compile_rules(
    rules: list[AnswerRule], path: Path, problems: list[Problem]
) -> tuple[CompiledRule, ...]:
    return tuple(_compile_rule(rule, (*path, i), problems) for i, rule in enumerate(rules))


def _echo_path(
    dotted: str | None, path: Path, problems: list[Problem]
) -> tuple[str | int, ...] | None:
    if dotted is None:
        return None
    if not all(dotted.split(".")):
        problems.append(
            Problem(
                path,
                f"must be a dotted path into the JSON answer (like data.amount), got {dotted!r}",
            )
        )
    return _field_path(dotted)


def _reader(
    answers: ResponseSpec | StatusSpec, path: Path, problems: list[Problem]
) -> AnswerReader:
    return AnswerReader(
        provider_reference=_echo_path(
            answers.provider_reference, (*path, "provider_reference"), problems
        ),
        reason=tuple(_field_path(p) for p in _as_list(answers.reason)),
        amount=_echo_path(answers.amount, (*path, "amount"), problems),
        currency=_echo_path(answers.currency, (*path, "currency"), problems),
    )


def compile_mapping(
    request: RequestSpec | None,
    response: ResponseSpec | None,
    has_default_payer: bool,
    path: Path,
    failure_statuses: Iterable[int] = BUSY_STATUSES,
) -> tuple[ProviderMapping, list[Problem]]:
    """Compile a provider's mapping (canonical where absent); problems carry their key paths."""
    compiler = TemplateCompiler()
    request_path = (*path, "request")
    spec = request or CANONICAL_REQUEST
    headers = tuple(
        (name, compiler.compile(value, (*request_path, "headers", name)))
        for name, value in spec.headers.items()
    )
    body = compiler.compile(spec.body, (*request_path, "body"))
    problems = [*compiler.problems, *_static_header_problems(spec, (*request_path, "headers"))]
    if request is not None and not compiler.names_used & {"reference", "idempotency_key"}:
        problems.append(
            Problem(
                request_path,
                "sends neither {reference} nor {idempotency_key}: a retry could charge twice",
            )
        )
    answers = response or CANONICAL_RESPONSE
    response_path = (*path, "response")
    success = _compile_rules(answers.success, (*response_path, "success"), problems)
    pending = _compile_rules(answers.pending, (*response_path, "pending"), problems)
    if not success and not pending:
        # A provider whose payments always start pending (MTN) answers success only later.
        problems.append(
            Problem((*response_path, "success"), "needs at least one rule (or `pending` ones)")
        )
    declined = _compile_rules(answers.declined, (*response_path, "declined"), problems)
    already_exists = _compile_rules(
        answers.already_exists, (*response_path, "already_exists"), problems
    )
    mapping = ProviderMapping(
        method=spec.method,
        headers=headers,
        body=body,
        success=success,
        declined=declined,
        already_exists=already_exists,
        reader=_reader(answers, response_path, problems),
        failure_statuses=frozenset(failure_statuses),
        # The canonical protocol sends `payer: null` when absent; a custom template that
        # names {payer} means the provider needs one.
        requires_payer=request is not None
        and "payer" in compiler.names_used
        and not has_default_payer,
        header_inputs=_header_inputs(headers),
        pending=pending,
        names_used=frozenset(compiler.names_used),
    )
    return mapping, problems


def compile_status(
    status: StatusSpec | None, canonical_url: str | None, path: Path
) -> tuple[StatusMapping | None, list[Problem]]:
    """Compile a provider's status query: its `status:`, else the canonical protocol's
    `GET {url}/{reference}` when `canonical_url` is given, else None (no status endpoint)."""
    if status is None:
        if canonical_url is None:
            return None, []
        status = StatusSpec(
            url=canonical_url.rstrip("/") + "/{reference}", **CANONICAL_STATUS_RULES
        )
    compiler = TemplateCompiler(STATUS_PLACEHOLDERS)
    status_path = (*path, "status")
    url = compiler.compile(status.url, (*status_path, "url"))
    headers = tuple(
        (name, compiler.compile(value, (*status_path, "headers", name)))
        for name, value in status.headers.items()
    )
    problems = [*compiler.problems, *_static_header_problems(status, (*status_path, "headers"))]
    names_payment = compiler.names_used & {"reference", "provider_reference"}
    if not names_payment and not compiler.problems:
        problems.append(
            Problem(
                (*status_path, "url"),
                "names neither {reference} nor {provider_reference}: it could not say which "
                "payment",
            )
        )
    rules: list[tuple[Outcome, tuple[CompiledRule, ...]]] = []
    outcomes: tuple[Outcome, ...] = ("success", "declined", "pending", "not_found")
    for outcome in outcomes:
        spec_rules = getattr(status, outcome)
        rules.append((outcome, _compile_rules(spec_rules, (*status_path, outcome), problems)))
    if not status.success:
        problems.append(Problem((*status_path, "success"), "needs at least one rule"))
    mapping = StatusMapping(
        method=status.method,
        url=url,
        headers=headers,
        rules=tuple(rules),
        reader=_reader(status, status_path, problems),
        # A status query never votes in the breaker: a 408 or 429 only says "slow down".
        failure_statuses=frozenset(),
        not_found_grace_s=status.not_found_grace_s,
        names_used=frozenset(compiler.names_used),
    )
    return mapping, problems


def _static_header_problems(spec: RequestSpec | StatusSpec, path: Path) -> list[Problem]:
    """Header names payagg cannot send, and CR, LF or NUL in a value as written (after ${VAR})."""
    problems = []
    for name, value in spec.headers.items():
        where = (*path, name)
        if not _HEADER_NAME.fullmatch(name):
            problems.append(
                Problem(where, "is not an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
            )
        elif name.lower() in _RESERVED_LOWER:
            problems.append(
                Problem(
                    where,
                    f"payagg writes {name} itself; a template may not set "
                    f"{', '.join(_RESERVED_HEADERS)}",
                )
            )
        unsafe = _UNSAFE_IN_HEADER.search(value)
        if unsafe:
            # The value itself is not shown: it is often a secret from the environment.
            problems.append(
                Problem(
                    where,
                    f"the value holds {_CONTROL_NAMES[unsafe.group()]} at character "
                    f"{unsafe.start() + 1}, which would split the request (from the environment, "
                    "with a trailing newline?)",
                )
            )
    return problems


def _header_inputs(
    headers: tuple[tuple[str, Part], ...],
) -> tuple[tuple[str, str, Callable[[PaymentFields], JsonValue]], ...]:
    inputs = []
    for header, part in headers:
        if isinstance(part, Placeholder):
            getters: tuple[Callable[[PaymentFields], JsonValue], ...] = (part.getter,)
        elif isinstance(part, Text):
            getters = tuple(piece for piece in part.pieces if not isinstance(piece, str))
        else:
            getters = ()
        for getter in getters:
            field = _REQUEST_FIELDS.get(_PLACEHOLDER_OF[getter])
            if field is not None:
                inputs.append((header, field, getter))
    return tuple(inputs)
