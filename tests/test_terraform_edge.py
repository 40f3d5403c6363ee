"""terraform/'s edge: what the ALB forwards, what it answers itself, who may reach it, the WAF.

The listener rules are read from the HCL and replayed by a small model of ALB routing (rules in
priority order, method and path-pattern conditions, else the listener's default action), so the
tests ask the questions a client would: does `GET /metrics` reach a task?
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest

from proxy.server.openapi import build_document
from tests.conftest import GatewayClient
from tests.terraform_checks.hcl import expression
from tests.test_terraform import (
    A_CERTIFICATE,
    evaluated,
    exists,
    plan,
    single,
    terraform,
)

# CONTRACT.md section 2: "Through the load balancer only POST /v1/pay, GET /v1/payments/*,
# PUT/POST /v1/callbacks/* and GET /healthz are reachable."
CONTRACT_ROUTES = {
    ("POST", "/v1/pay"),
    ("GET", "/v1/payments/*"),
    ("PUT", "/v1/callbacks/*"),
    ("POST", "/v1/callbacks/*"),
    ("GET", "/healthz"),
}
# Requests the public must reach, as a client or a provider sends them.
PUBLIC_REQUESTS = [
    ("POST", "/v1/pay"),
    ("GET", "/v1/payments/TXN-ID-022-1"),
    ("PUT", "/v1/callbacks/MTN/c2lnbmVk"),
    ("POST", "/v1/callbacks/AIRTEL/c2lnbmVk"),
    ("GET", "/healthz"),
]
# Operator surfaces (CONTRACT.md: served on server.admin_port) and near misses of the public routes.
OPERATOR_PATHS = [
    "/metrics",
    "/v1/providers",
    "/openapi.json",
    "/readyz",
    "/admin/reload",
    "/admin/breakers/MTN",
    "/__mock/stats",
]
NEAR_MISSES = [
    ("GET", "/v1/pay"),
    ("POST", "/v1/pay/"),
    ("POST", "/V1/PAY"),
    ("POST", "/v1/payx"),
    ("DELETE", "/v1/payments/TXN-1"),
    ("POST", "/v1/payments/TXN-1"),
    ("GET", "/v1/payments"),
    ("GET", "/v1/callbacks/MTN/token"),
    ("POST", "/healthz"),
    ("GET", "/"),
]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Paths a wildcard rule forwards whose dot segments, if anything resolved them, would name an
# operator surface.
DOT_SEGMENT_REQUESTS = [
    ("GET", "/v1/payments/../../metrics"),
    ("GET", "/v1/payments/%2e%2e/%2e%2e/openapi.json"),
    ("PUT", "/v1/callbacks/../../admin/reload"),
]


# --- a model of ALB routing, read from the HCL ------------------------------------------------


def alb_path_matches(pattern: str, path: str) -> bool:
    """ALB path patterns: case-sensitive, whole path, `*` any characters (`/` too), `?` one."""
    translated = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    return re.fullmatch(translated, path, re.DOTALL) is not None


def local_value(value: Any) -> Any:
    """A value, with `local.a.b` (as a whole expression) replaced by what the locals hold."""
    found = re.fullmatch(r"local\.([\w.]+)", str(expression(value)))
    if not found:
        return value
    resolved: Any = terraform().locals
    for key in found.group(1).split("."):
        resolved = resolved[key]
    return resolved


@dataclass(frozen=True)
class Rule:
    name: str
    listener: str
    priority: int
    methods: frozenset[str] | None  # None: the rule has no method condition, so any method
    paths: tuple[str, ...] | None  # None: no path condition, so any path
    action: dict[str, Any]

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and (
            self.paths is None or any(alb_path_matches(p, path) for p in self.paths)
        )

    def pairs(self) -> set[tuple[str, str]]:
        assert self.methods is not None, f"{self.name} forwards every method"
        assert self.paths is not None, f"{self.name} forwards every path"
        return set(itertools.product(self.methods, self.paths))


def each_value(value: Any, route: dict[str, Any]) -> Any:
    """A rule's argument: literal, or `each.value.NAME` of the route the rule is created for."""
    found = re.fullmatch(r"each\.value\.(\w+)", str(expression(value)))
    if not found:
        assert "${" not in str(value), f"cannot read {value!r}"
        return value
    return route[found.group(1)]


def for_each_routes(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The routes a rule resource is created for: the map of routes its for_each iterates."""
    if "for_each" not in body:
        return {"": {}}
    maps = [
        terraform().locals[name]
        for name in re.findall(r"\blocal\.(\w+)", str(body["for_each"]))
        if isinstance(terraform().locals.get(name), dict)
    ]
    assert len(maps) == 1, f"cannot tell which routes for_each = {body['for_each']} iterates"
    return dict(maps[0])


@cache
def rules() -> tuple[Rule, ...]:
    expanded = []
    for name, body in terraform().resources_of("aws_lb_listener_rule").items():
        listener = re.sub(r"\[0\]$", "", str(expression(body["listener_arn"])).removesuffix(".arn"))
        for key, route in for_each_routes(body).items():
            methods: list[str] | None = None
            paths: list[str] | None = None
            for condition in body["condition"]:
                (kind,) = condition
                values = list(each_value(single(condition[kind])["values"], route))
                if kind == "http_request_method":
                    methods = values
                elif kind == "path_pattern":
                    paths = values
                else:
                    pytest.fail(f"{name}: the model does not know {kind} conditions")
            expanded.append(
                Rule(
                    name=f'{name}["{key}"]',
                    listener=listener,
                    priority=each_value(body["priority"], route),
                    methods=None if methods is None else frozenset(methods),
                    paths=None if paths is None else tuple(paths),
                    action=single(body["action"]),
                )
            )
    return tuple(expanded)


def listeners() -> dict[str, dict[str, Any]]:
    return {
        f"aws_lb_listener.{name}": body
        for name, body in terraform().resources_of("aws_lb_listener").items()
        if expression(body["load_balancer_arn"]) == "aws_lb.payagg.arn"
    }


LISTENERS = sorted(listeners())


def route(listener: str, method: str, path: str) -> Rule | None:
    """The rule the ALB applies to a request on `listener`; None: the listener's default action."""
    on_listener = sorted((r for r in rules() if r.listener == listener), key=lambda r: r.priority)
    return next((rule for rule in on_listener if rule.matches(method, path)), None)


def not_public() -> list[tuple[str, str]]:
    """Every request the ALB must refuse: operator paths with any method, near misses, and every
    route of payagg's own API document that the contract does not make public."""
    document = build_document(["MTN"])
    served = [
        (method.upper(), re.sub(r"\{[^}]+\}", "TXN-1", path))
        for path, operations in document["paths"].items()
        for method in operations
        if method.upper() in METHODS
    ]
    refused = [(method, path) for path in OPERATOR_PATHS for method in METHODS] + NEAR_MISSES
    refused += [
        (method, path)
        for method, path in served
        if not any(m == method and alb_path_matches(p, path) for m, p in CONTRACT_ROUTES)
    ]
    return sorted(set(refused))


# --- the listeners ----------------------------------------------------------------------------


def default_response(listener: str) -> dict[str, Any]:
    """The fixed response a listener's default action answers (locals resolved)."""
    action = single(listeners()[listener]["default_action"])
    assert action["type"] == "fixed-response", f"{listener} does not answer by itself"
    return {key: local_value(value) for key, value in single(action["fixed_response"]).items()}


@pytest.mark.parametrize("listener", LISTENERS, ids=LISTENERS)
async def test_every_listener_answers_what_no_rule_forwards_as_payagg_answers_an_unknown_route(
    listener: str, gateway: GatewayClient
) -> None:
    response = default_response(listener)
    answer = await gateway.get("/no/such/route")
    assert answer.status == int(response["status_code"]) == 404
    assert answer.content_type == response["content_type"]
    assert await answer.json() == json.loads(response["message_body"])


@pytest.mark.parametrize("listener", LISTENERS, ids=LISTENERS)
def test_each_listener_forwards_exactly_the_contracts_public_routes(listener: str) -> None:
    on_listener = [rule for rule in rules() if rule.listener == listener]
    forwarded = set().union(*(rule.pairs() for rule in on_listener))
    assert forwarded == CONTRACT_ROUTES


@pytest.mark.parametrize("listener", LISTENERS, ids=LISTENERS)
def test_rule_priorities_are_unique_on_each_listener(listener: str) -> None:
    priorities = [rule.priority for rule in rules() if rule.listener == listener]
    assert len(priorities) == len(set(priorities)), priorities


@pytest.mark.parametrize(
    ("listener", "method", "path"),
    [(listener, *request) for listener in LISTENERS for request in PUBLIC_REQUESTS],
    ids=[f"{listener} {m} {p}" for listener in LISTENERS for m, p in PUBLIC_REQUESTS],
)
def test_the_public_requests_pass_the_alb(listener: str, method: str, path: str) -> None:
    assert route(listener, method, path) is not None


@pytest.mark.parametrize(
    ("listener", "method", "path"),
    [(listener, *request) for listener in LISTENERS for request in not_public()],
    ids=[f"{listener} {m} {p}" for listener in LISTENERS for m, p in not_public()],
)
def test_no_rule_lets_an_operator_route_or_a_near_miss_through(
    listener: str, method: str, path: str
) -> None:
    rule = route(listener, method, path)
    assert rule is None, f"{method} {path} is forwarded by {rule and rule.name}"


@pytest.mark.parametrize("rule", rules(), ids=[rule.name for rule in rules()])
def test_every_rule_forwards_to_the_proxy_or_redirects_to_https(rule: Rule) -> None:
    kind = str(expression(rule.action["type"]))
    possible = set(re.findall(r'"([^"]+)"', kind)) or {kind}
    assert possible <= {"forward", "redirect"}, kind
    if "forward" in possible:
        assert "aws_lb_target_group.proxy.arn" in str(rule.action["target_group_arn"])
    if "redirect" in possible:
        redirect = single(single(rule.action["dynamic"])["redirect"])
        assert single(redirect["content"])["protocol"] == "HTTPS"
        assert rule.listener == "aws_lb_listener.http", "only plain HTTP is ever redirected"


def rule_actions(certificate: str) -> dict[str, tuple[int, str]]:
    """Per listener rule resource, as Terraform evaluates it for `certificate_arn`: how many rules
    its for_each creates, and what their action is."""
    expressions: dict[str, Any] = {}
    for name, body in terraform().resources_of("aws_lb_listener_rule").items():
        expressions[f"{name}_rules"] = f"${{length({expression(body['for_each'])})}}"
        expressions[f"{name}_action"] = single(body["action"])["type"]
    values = evaluated({"certificate_arn": certificate}, expressions)
    return {
        name: (values[f"{name}_rules"], values[f"{name}_action"])
        for name in terraform().resources_of("aws_lb_listener_rule")
    }


def test_with_a_certificate_http_only_redirects_and_https_forwards() -> None:
    routes = len(terraform().locals["public_routes"])
    assert rule_actions(A_CERTIFICATE) == {
        "http": (routes, "redirect"),
        "https": (routes, "forward"),
    }


def test_without_a_certificate_http_forwards_and_there_are_no_https_rules() -> None:
    routes = len(terraform().locals["public_routes"])
    assert rule_actions("") == {"http": (routes, "forward"), "https": (0, "forward")}


async def test_a_forwarded_path_with_dot_segments_never_reaches_an_operator_route(
    gateway: GatewayClient,
) -> None:
    """Whether or not the ALB resolves `..`, payagg matches the raw path and answers 404."""
    for method, path in DOT_SEGMENT_REQUESTS:
        assert route("aws_lb_listener.http", method, path), f"{path} is not forwarded: no test"
        reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
        request = f"{method} {path} HTTP/1.1\r\nHost: payagg\r\nContent-Length: 0\r\n"
        writer.write(f"{request}Connection: close\r\n\r\n".encode())
        await writer.drain()
        head, _, body = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()
        assert head.split(b" ", 2)[1] == b"404", (path, head)
        assert json.loads(body)["error"] == "not_found", path


# --- who may reach the ALB --------------------------------------------------------------------


def alb_ingress_rules() -> dict[str, dict[str, Any]]:
    return {
        name: rule
        for name, rule in terraform().resources_of("aws_vpc_security_group_ingress_rule").items()
        if expression(rule["security_group_id"]) == "aws_security_group.alb.id"
    }


@pytest.mark.parametrize("name", sorted(alb_ingress_rules()), ids=sorted(alb_ingress_rules()))
def test_the_alb_admits_only_the_cidrs_of_the_variable(name: str) -> None:
    rule = alb_ingress_rules()[name]
    if name == "alb_callbacks_from_nat":  # the mocks' callbacks, from the VPC's own NAT addresses
        assert rule["cidr_ipv4"] == "${module.vpc.nat_public_ips[count.index]}/32"
        return
    assert expression(rule["cidr_ipv4"]) == "each.value"
    for_each = str(rule["for_each"])
    assert set(re.findall(r"\bvar\.(\w+)", for_each)) == {"alb_ingress_cidrs"}, for_each
    assert not re.search(r"\d+\.\d+\.\d+\.\d+", for_each), f"a literal address in {for_each}"


def test_every_listener_port_is_admitted_by_an_ingress_rule() -> None:
    admitted = {(rule["from_port"], rule["to_port"]) for rule in alb_ingress_rules().values()}
    assert {(body["port"], body["port"]) for body in listeners().values()} <= admitted


def test_nothing_reaches_the_tasks_but_the_alb_on_the_proxy_port_and_collectors_on_9090() -> None:
    """The admin port (server.admin_port) is reachable inside the task, over loopback, and from
    the metrics collectors' security groups only; the ALB sends to the proxy port only."""
    port = terraform().resource("aws_lb_target_group", "proxy")["port"]
    into_tasks = {
        name: rule
        for name, rule in terraform().resources_of("aws_vpc_security_group_ingress_rule").items()
        if expression(rule["security_group_id"]) == "aws_security_group.service.id"
    }
    assert set(into_tasks) == {"service_from_alb", "service_admin_from_collectors"}
    from_alb = into_tasks["service_from_alb"]
    assert (from_alb["from_port"], from_alb["to_port"]) == (port, port)
    assert expression(from_alb["referenced_security_group_id"]) == "aws_security_group.alb.id"
    admin = into_tasks["service_admin_from_collectors"]
    assert (admin["from_port"], admin["to_port"]) == (9090, 9090)
    assert expression(admin["referenced_security_group_id"]) == "each.value"
    assert "var.metrics_collector_security_group_ids" in str(admin["for_each"])
    assert "cidr_ipv4" not in admin
    assert port != 9090


@pytest.mark.parametrize(
    "cidrs",
    [["0.0.0.0/0"], ["203.0.113.0/24", "198.51.100.7/32"]],
    ids=["the default: anywhere", "an office and a host"],
)
def test_terraform_accepts_ipv4_blocks_as_alb_ingress(cidrs: list[str]) -> None:
    result = plan(alb_ingress_cidrs=cidrs)
    assert result.accepted, result.output


@pytest.mark.parametrize(
    "cidrs",
    [[], ["::/0"], ["10.0.0.1/8"], ["10.0.0.0/33"], ["example.com"]],
    ids=["empty", "ipv6", "host bits set", "prefix too long", "not a cidr"],
)
def test_terraform_refuses_alb_ingress_that_is_not_ipv4_blocks(cidrs: list[str]) -> None:
    result = plan(alb_ingress_cidrs=cidrs)
    assert not result.accepted
    assert "alb_ingress_cidrs" in result.output


# --- the web application firewall -------------------------------------------------------------


def waf_resources() -> dict[str, dict[str, Any]]:
    config = terraform()
    found = {f"{kind}.{name}": body for (kind, name), body in config.resources.items()}
    return {
        address: body
        for address, body in found.items()
        if address.startswith("aws_wafv2_") or address == "aws_cloudwatch_log_group.waf"
    }


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
def test_every_waf_resource_exists_exactly_when_waf_is_enabled(enabled: bool) -> None:
    addresses = [address.split(".", 1) for address in waf_resources()]
    counts = exists([(kind, name) for kind, name in addresses], waf_enabled=enabled)
    assert counts == dict.fromkeys(waf_resources(), int(enabled))


def test_the_web_acl_is_associated_with_the_alb() -> None:
    config = terraform()
    associated = [
        association
        for association in config.resources_of("aws_wafv2_web_acl_association").values()
        if expression(association["resource_arn"]) == "aws_lb.payagg.arn"
    ]
    assert len(associated) == 1
    acl = re.fullmatch(
        r"aws_wafv2_web_acl\.(\w+)\[0\]\.arn", expression(associated[0]["web_acl_arn"])
    )
    assert acl, associated[0]["web_acl_arn"]
    # An ALB takes only a regional web ACL; CLOUDFRONT would fail at apply.
    assert config.resource("aws_wafv2_web_acl", acl[1])["scope"] == "REGIONAL"


def test_the_web_acl_blocks_a_source_ip_over_the_variable_rate_with_payaggs_429() -> None:
    acl = terraform().resource("aws_wafv2_web_acl", "alb")
    assert "allow" in single(acl["default_action"]), "the ACL must let the rest through"
    (rate_rule,) = [
        rule for rule in acl["rule"] if "rate_based_statement" in single(rule["statement"])
    ]
    statement = single(single(rate_rule["statement"])["rate_based_statement"])
    assert statement["aggregate_key_type"] == "IP"
    assert expression(statement["limit"]) == "var.waf_rate_limit_per_5min"
    response = single(single(single(rate_rule["action"])["block"])["custom_response"])
    assert response["response_code"] == 429
    (body,) = [
        body
        for body in acl["custom_response_body"]
        if body["key"] == response["custom_response_body_key"]
    ]
    assert body["content_type"] == "APPLICATION_JSON"
    assert json.loads(local_value(body["content"]))["error"] == "rate_limited"


@pytest.mark.parametrize("limit", [50, 150.5], ids=["below waf's minimum", "not whole"])
def test_terraform_refuses_a_rate_limit_waf_would_refuse(limit: float) -> None:
    result = plan(waf_rate_limit_per_5min=limit)
    assert not result.accepted
    assert "waf_rate_limit_per_5min" in result.output


def test_the_defaults_pass_their_own_validation() -> None:
    result = plan()
    assert result.accepted, result.output


def test_waf_logs_go_to_an_encrypted_group_waf_accepts_without_credentials() -> None:
    config = terraform()
    logging = config.resource("aws_wafv2_web_acl_logging_configuration", "alb")
    assert expression(logging["resource_arn"]) == "aws_wafv2_web_acl.alb[0].arn"
    assert logging["log_destination_configs"] == ["${aws_cloudwatch_log_group.waf[0].arn}"]
    group = config.resource("aws_cloudwatch_log_group", "waf")
    assert group["name"].startswith("aws-waf-logs-")
    assert expression(group["kms_key_id"]) == "aws_kms_key.payagg.arn"
    redacted = [single(field["single_header"])["name"] for field in logging["redacted_fields"]]
    assert "authorization" in redacted
