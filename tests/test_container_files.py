"""Dockerfile, .dockerignore and compose.yaml, checked statically against the code they run."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from mock_providers import cli as mock_cli
from proxy.settings.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "compose.yaml"
SHIPPED_CONFIG = ROOT / "config" / "gateway.yaml"
HADOLINT = Path(sys.executable).parent / "hadolint"

CONFIG_REFERENCE = re.compile(r"\$\{([A-Z0-9_]+)(:-[^}]*)?\}")
URL = re.compile(r"https?://[^\s'\"]+")
PROXY_ENV_OUTSIDE_THE_CONFIG = {"PAYAGG_CONFIG", "LOG_LEVEL", "PAYAGG_ADMIN_TOKEN"}
MOCK_ENV = {option.env for option in mock_cli.OPTIONS}
SERVICES = ["redis", "proxy", "mtn", "airtel"]
PAYAGG_SERVICES = ["proxy", "mtn", "airtel"]
MOCKS = ["mtn", "airtel"]
OBSERVABILITY = ["prometheus", "grafana"]
PROVIDER_URL_VARIABLE = {"mtn": "MTN_URL", "airtel": "AIRTEL_URL"}


# --- reading the Dockerfile ------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        variables: dict[str, str] = {}
        for arguments in self.all("ENV"):
            words = shlex.split(arguments)
            if "=" not in words[0]:  # the legacy `ENV KEY value` form
                variables[words[0]] = " ".join(words[1:])
                continue
            variables.update(word.split("=", 1) for word in words)
        return variables

    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of each COPY from the build context (not from another stage)."""
        found = []
        for arguments in self.all("COPY"):
            words = shlex.split(arguments)
            if any(word.startswith("--from") for word in words):
                continue
            paths = [word for word in words if not word.startswith("--")]
            found.append((paths[:-1], paths[-1]))
        return found


@cache
def dockerfile_stages() -> tuple[Stage, ...]:
    """The Dockerfile's stages: continuation lines joined, comments dropped (as BuildKit does)."""
    logical_lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical_lines.append(pending + line)
        pending = ""
    if pending:
        logical_lines.append(pending)

    stages: list[Stage] = []
    for line in logical_lines:
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            words = [w for w in arguments.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name, ()))
        elif stages:
            last = stages[-1]
            stages[-1] = Stage(last.base, last.name, (*last.instructions, instruction))
    return tuple(stages)


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def exec_form(arguments: str, where: str) -> list[str]:
    try:
        argv = json.loads(arguments)
    except json.JSONDecodeError:
        pytest.fail(f"{where} should use the exec (JSON) form, so signals reach it: {arguments}")
    assert isinstance(argv, list), arguments
    assert all(isinstance(word, str) for word in argv), arguments
    return argv


def image_command() -> list[str]:
    commands = final_stage().all("CMD")
    assert len(commands) == 1, f"the final stage should have exactly one CMD, has {commands}"
    return exec_form(commands[0], "CMD")


def image_healthcheck() -> list[str]:
    healthchecks = final_stage().all("HEALTHCHECK")
    assert len(healthchecks) == 1, f"the final stage needs one HEALTHCHECK, has {healthchecks}"
    match = re.search(r"\bCMD\s+(.*)$", healthchecks[0])
    assert match, f"HEALTHCHECK without CMD: {healthchecks[0]}"
    return exec_form(match.group(1), "HEALTHCHECK")


def exposed_ports() -> set[int]:
    exposed = " ".join(final_stage().all("EXPOSE")).split()
    return {int(port.split("/")[0]) for port in exposed}


# --- reading .dockerignore (the patternmatcher rules Docker uses) ------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            regex, i = regex + "[" + pattern[i + 1:end].replace("!", "^", 1) + "]", end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)


@cache
def dockerignore_rules() -> tuple[tuple[bool, re.Pattern[str]], ...]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        reinclude = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        rules.append((reinclude, _pattern_regex(pattern)))
    return tuple(rules)


def left_out_of_the_build_context(path: str) -> bool:
    """A path is left out when the last pattern matching it, or one of its parents, excludes it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    left_out = False
    for reinclude, regex in dockerignore_rules():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            left_out = not reinclude
    return left_out


def copied_sources() -> list[str]:
    copies = [copy for stage in dockerfile_stages() for copy in stage.copies()]
    return sorted({source for sources, _ in copies for source in sources})


# --- reading compose.yaml and the shipped config ----------------------------------------------

@cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def service(name: str) -> dict[str, Any]:
    services = compose().get("services", {})
    assert name in services, f"compose.yaml has no service {name!r}; it has {sorted(services)}"
    return dict(services[name])


def environment(name: str) -> dict[str, str | None]:
    declared = service(name).get("environment", {})
    if isinstance(declared, list):
        pairs = [entry.split("=", 1) if "=" in entry else [entry, None] for entry in declared]
        return {key: value for key, value in pairs}
    return {key: None if value is None else str(value) for key, value in declared.items()}


def command(name: str) -> list[str]:
    """What the service runs: its own command, else the image's CMD."""
    declared = service(name).get("command")
    if declared is None:
        return image_command()
    return shlex.split(declared) if isinstance(declared, str) else [str(word) for word in declared]


def healthcheck_argv(name: str) -> list[str]:
    test = service(name).get("healthcheck", {}).get("test")
    assert test, f"{name} has no healthcheck test"
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return [str(word) for word in test]


def option(argv: list[str], flag: str) -> str | None:
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def compose_default(value: str | None) -> str | None:
    """`x` for a value written `${NAME:-x}`, else None."""
    match = CONFIG_REFERENCE.fullmatch(value or "")
    return match.group(2)[2:] if match and match.group(2) else None


@cache
def config_references() -> dict[str, set[str]]:
    """Each variable the shipped config reads, with the defaults it gives it."""
    assert SHIPPED_CONFIG.exists(), f"{SHIPPED_CONFIG.relative_to(ROOT)} does not exist yet"
    references: dict[str, set[str]] = {}
    for match in CONFIG_REFERENCE.finditer(SHIPPED_CONFIG.read_text()):
        defaults = references.setdefault(match.group(1), set())
        if match.group(2):
            defaults.add(match.group(2)[2:])
    return references


def shipped_config_with_defaults() -> dict[str, Any]:
    """The shipped config as the proxy reads it when no variable is set."""
    config_references()  # fails clearly while the file is missing
    text = CONFIG_REFERENCE.sub(lambda m: (m.group(2) or ":-")[2:], SHIPPED_CONFIG.read_text())
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def cli_parser(script: str) -> argparse.ArgumentParser:
    """The parser behind a console script, found through pyproject's [project.scripts]."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert script in scripts, f"{script!r} is not one of the console scripts {sorted(scripts)}"
    module_name = scripts[script].partition(":")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        pytest.fail(f"{script}'s module {module_name} cannot be imported yet: {error}")
    assert hasattr(module, "build_parser"), f"{module_name} has no build_parser()"
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def seconds(duration: str | int) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration)):
        total += float(amount) * units[unit]
    return total


# --- the Dockerfile ----------------------------------------------------------------------------

def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    assert HADOLINT.exists(), f"hadolint is not installed next to {sys.executable} (dev extras)"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", DOCKERFILE.name], cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )
    findings = f"hadolint findings:\n{result.stdout}{result.stderr}"
    assert result.returncode == 0, findings
    assert not result.stdout.strip(), findings


def test_a_builder_stage_builds_the_wheels_and_the_final_stage_only_installs_them() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile should be multi-stage"
    builds = " ".join(run for stage in stages[:-1] for run in stage.all("RUN"))
    assert re.search(r"pip wheel|python -m build", builds), "no stage before the last builds wheels"
    installs = " ".join(final_stage().all("RUN"))
    assert "pip install" in installs, "the final stage should install the built wheels"
    assert "--no-index" in installs, "the final stage should install nothing from an index"
    copied_into_the_final_stage = {src for srcs, _ in final_stage().copies() for src in srcs}
    assert copied_into_the_final_stage <= {"config/gateway.yaml"}, (
        f"the final stage should get code only as wheels, yet copies {copied_into_the_final_stage}"
    )


def test_the_final_stage_is_a_slim_python_that_pyproject_accepts_without_compilers() -> None:
    official_slim = r"python:(\d+\.\d+)[.\d]*-slim[-\w]*(@sha256:[0-9a-f]{64})?"
    base = re.fullmatch(official_slim, final_stage().base)
    assert base, f"the final stage should be an official python slim image: {final_stage().base}"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(base.group(1)), (final_stage().base, requires)
    for run in final_stage().all("RUN"):
        assert not re.search(r"\b(gcc|g\+\+|build-essential|apt-get install)\b", run), run
        if "pip install" in run:
            cache_off = final_stage().env().get("PIP_NO_CACHE_DIR") == "1"
            assert "--no-cache-dir" in run or cache_off, run


def test_the_final_stage_runs_as_the_non_root_uid_compose_gives_it_and_creates_it() -> None:
    users = final_stage().all("USER")
    assert users, "the final stage never switches away from root"
    uid = users[-1].split(":")[0]
    assert uid not in {"0", "root"}, f"the final USER is {users[-1]}"
    assert str(service("proxy").get("user", "")).split(":")[0] == uid, "compose runs another uid"
    created = rf"useradd\b.*--uid {re.escape(uid)}\b"
    assert any(re.search(created, run) for run in final_stage().all("RUN")), (
        f"uid {uid} is never created in the final stage"
    )


def test_payagg_config_points_where_the_shipped_config_is_copied() -> None:
    destination = final_stage().env().get("PAYAGG_CONFIG")
    assert destination, "the final stage does not set PAYAGG_CONFIG"
    sources = [srcs for srcs, dest in final_stage().copies() if dest == destination]
    assert sources == [["config/gateway.yaml"]], f"what is copied to {destination}: {sources}"


@pytest.mark.parametrize("source", copied_sources(), ids=copied_sources())
def test_every_file_the_dockerfile_copies_exists_in_the_repo(source: str) -> None:
    assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"


@pytest.mark.parametrize("source", copied_sources(), ids=copied_sources())
def test_the_dockerignore_lets_in_every_file_the_dockerfile_copies(source: str) -> None:
    files = [source]
    if (ROOT / source).is_dir():
        files += [
            path.relative_to(ROOT).as_posix() for path in (ROOT / source).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        ]
    assert [path for path in files if left_out_of_the_build_context(path)] == []


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python", ".git/HEAD", ".pytest_cache/v/cache/nodeids",
        "proxy/__pycache__/app.cpython-311.pyc", ".mypy_cache/3.11/proxy/app.meta.json",
        "terraform/terraform.tfstate", "terraform/.terraform/providers/aws",
        "tests/test_end_to_end.py", "payagg.egg-info/PKG-INFO", ".env",
    ],
    ids=["venv", "git", "pytest-cache", "bytecode", "mypy-cache", "terraform-state",
         "terraform-providers", "tests", "egg-info", "dotenv"],
)
def test_the_dockerignore_keeps_local_state_out_of_the_build_context(path: str) -> None:
    assert left_out_of_the_build_context(path)


def test_the_image_healthcheck_asks_healthz_on_the_exposed_port_with_python() -> None:
    argv = image_healthcheck()
    assert argv[:2] == ["python", "-c"], f"the slim image has python, not curl: {argv}"
    urls = URL.findall(argv[2])
    assert len(urls) == 1, argv
    url = urlsplit(urls[0])
    assert url.path == "/healthz"
    served = int(shipped_config_with_defaults()["server"]["port"])
    assert url.port == served, (url.port, served)
    assert served in exposed_ports(), (served, exposed_ports())


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_runs_redis_the_proxy_and_both_mocks() -> None:
    default = [name for name, spec in compose()["services"].items() if "profiles" not in spec]
    assert sorted(default) == sorted(SERVICES)


def test_compose_validates_against_the_compose_specification_schema() -> None:
    # check-jsonschema vendors the Compose specification's JSON schema (compose-spec.json).
    checked = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("name", OBSERVABILITY, ids=OBSERVABILITY)
def test_prometheus_and_grafana_run_only_in_the_observability_profile(name: str) -> None:
    assert service(name).get("profiles") == ["observability"]
    assert service(name).get("read_only") is True
    assert str(service(name).get("user", "0")).split(":")[0] not in {"", "0", "root"}
    for port in service(name).get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


@pytest.mark.parametrize("name", OBSERVABILITY, ids=OBSERVABILITY)
def test_every_file_the_observability_services_mount_exists(name: str) -> None:
    for volume in service(name).get("volumes", []):
        source = str(volume).split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_scrapes_the_proxy_on_its_admin_port_and_loads_the_alerts() -> None:
    scrape = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    (targets,) = [group["targets"] for group in job["static_configs"]]
    admin_port = load_config(ROOT / "config" / "gateway.yaml", {}).server.admin_port
    assert targets == [f"proxy:{admin_port}"]
    published = [str(port).split(":")[-1] for port in service("proxy")["ports"]]
    assert str(admin_port) not in published
    mounted = {str(v).split(":")[1]: str(v).split(":")[0] for v in service("prometheus")["volumes"]}
    assert scrape["rule_files"], "prometheus loads no alert rules"
    for path in scrape["rule_files"]:
        assert path in mounted, f"prometheus loads {path}, which compose does not mount"
        assert yaml.safe_load((ROOT / mounted[path]).read_text())["groups"], mounted[path]


def test_grafana_provisions_the_dashboard_from_the_folder_compose_mounts() -> None:
    providers = yaml.safe_load(
        (ROOT / "ops" / "grafana" / "provisioning" / "dashboards" / "payagg.yaml").read_text()
    )["providers"]
    mounted = {str(v).split(":")[1]: str(v).split(":")[0] for v in service("grafana")["volumes"]}
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounted, f"grafana provisions from {path}, which compose does not mount"
        dashboards = list((ROOT / mounted[path]).glob("*.json"))
        assert dashboards, f"{mounted[path]} holds no dashboard"
        assert all(json.loads(dashboard.read_text())["panels"] for dashboard in dashboards)


def pulled_images() -> list[str]:
    """Every image pulled from a registry: the Dockerfile's bases and compose's unbuilt images."""
    stage_names = {stage.name for stage in dockerfile_stages()}
    bases = [stage.base for stage in dockerfile_stages() if stage.base not in stage_names]
    unbuilt = [str(spec["image"]) for spec in compose()["services"].values() if "build" not in spec]
    return sorted(set(bases + unbuilt))


@pytest.mark.parametrize("image", pulled_images(), ids=pulled_images())
def test_no_image_is_pulled_by_a_floating_tag(image: str) -> None:
    reference, _, digest = image.partition("@")
    name_and_tag = reference.rpartition("/")[2]
    tag = name_and_tag.partition(":")[2]
    assert re.match(r"v?\d+\.\d+\.\d+", tag) or digest, (
        f"{image}: pin an exact version (or a digest), never latest or a major-only tag"
    )


@pytest.mark.parametrize("name", SERVICES, ids=SERVICES)
def test_only_the_proxy_publishes_a_port(name: str) -> None:
    published = [str(port) for port in service(name).get("ports", [])]
    assert len(published) == (1 if name == "proxy" else 0), published


@pytest.mark.parametrize("name", SERVICES, ids=SERVICES)
def test_every_service_has_a_healthcheck(name: str) -> None:
    healthcheck = service(name).get("healthcheck", {})
    assert healthcheck.get("disable") is not True
    assert healthcheck_argv(name)[0] in {"CMD", "CMD-SHELL"}


def test_the_proxy_waits_for_a_healthy_redis_and_never_for_the_mocks() -> None:
    depends_on = service("proxy").get("depends_on", {})
    assert isinstance(depends_on, dict)
    assert depends_on.get("redis", {}).get("condition") == "service_healthy"
    assert not set(depends_on) & set(MOCKS), "the mocks join the proxy's namespace: that is a cycle"


@pytest.mark.parametrize("name", MOCKS, ids=MOCKS)
def test_the_mocks_start_once_the_proxy_namespace_exists(name: str) -> None:
    depends_on = service(name).get("depends_on", {})
    assert depends_on.get("proxy", {}).get("condition") == "service_started"


@pytest.mark.parametrize("name", SERVICES, ids=SERVICES)
def test_every_container_runs_as_non_root_on_a_read_only_filesystem(name: str) -> None:
    user = str(service(name).get("user", "")).split(":")[0]
    if not user and "build" in service(name):
        user = final_stage().all("USER")[-1].split(":")[0]
    assert user not in {"", "0", "root"}, f"{name} runs as root"
    assert service(name).get("read_only") is True


@pytest.mark.parametrize("name", PAYAGG_SERVICES, ids=PAYAGG_SERVICES)
def test_payagg_containers_run_under_an_init_that_forwards_signals(name: str) -> None:
    assert service(name).get("init") is True


def test_the_proxy_gets_time_to_drain_before_it_is_killed() -> None:
    grace = seconds(service("proxy").get("stop_grace_period", "10s"))
    drain = float(shipped_config_with_defaults()["server"]["shutdown_timeout_s"])
    assert grace > drain, f"stop_grace_period {grace}s leaves no margin over the {drain}s drain"


def test_the_proxy_healthcheck_is_the_image_healthcheck() -> None:
    assert healthcheck_argv("proxy") == ["CMD", *image_healthcheck()]


@pytest.mark.parametrize(
    "where", ["Dockerfile CMD", *PAYAGG_SERVICES], ids=["image", *PAYAGG_SERVICES]
)
def test_every_command_is_accepted_by_the_real_cli_parser(where: str) -> None:
    argv = image_command() if where == "Dockerfile CMD" else command(where)
    parser = cli_parser(argv[0])
    try:
        parser.parse_args(argv[1:])
    except SystemExit as exit_:
        pytest.fail(f"{where}: {argv[0]} rejects {argv[1:]} (exit {exit_.code})")


@pytest.mark.parametrize("variable", sorted(environment("proxy")), ids=sorted(environment("proxy")))
def test_every_variable_compose_gives_the_proxy_is_one_the_shipped_config_reads(
    variable: str,
) -> None:
    if variable not in PROXY_ENV_OUTSIDE_THE_CONFIG:
        assert variable in config_references(), (
            f"compose sets {variable}, which {SHIPPED_CONFIG.relative_to(ROOT)} never reads: "
            f"it reads {sorted(config_references())}"
        )


def same_setting(left: str, right: str) -> bool:
    try:
        return float(left) == float(right)
    except ValueError:
        return left == right


@pytest.mark.parametrize("variable", sorted(environment("proxy")), ids=sorted(environment("proxy")))
def test_compose_defaults_agree_with_the_shipped_config_defaults(variable: str) -> None:
    ours = compose_default(environment("proxy")[variable])
    if ours is None:
        return  # a fixed value, not a default: compose means to override the config here
    theirs = config_references().get(variable, set())
    assert all(same_setting(ours, default) for default in theirs), (
        f"compose defaults {variable} to {ours}, the shipped config to {sorted(theirs)}"
    )


@pytest.mark.parametrize(
    ("name", "variable"),
    [(name, variable) for name in MOCKS for variable in sorted(environment(name))],
    ids=[f"{name}-{variable}" for name in MOCKS for variable in sorted(environment(name))],
)
def test_every_variable_compose_gives_a_mock_is_one_the_mocks_read(
    name: str, variable: str
) -> None:
    assert variable in MOCK_ENV


@pytest.mark.parametrize("name", MOCKS, ids=MOCKS)
def test_each_mock_listens_where_the_proxy_looks_for_it(name: str) -> None:
    argv = command(name)
    assert argv[0] == "payagg-mock", argv
    assert option(argv, "--provider") == name, argv
    proxy_url = environment("proxy").get(PROVIDER_URL_VARIABLE[name])
    assert proxy_url, f"compose does not tell the proxy where {name} is"
    expected = urlsplit(proxy_url)
    # Loopback, because the mock lives in the proxy's network namespace.
    assert expected.hostname == option(argv, "--host") == "127.0.0.1", (proxy_url, argv)
    assert str(expected.port) == option(argv, "--port"), (proxy_url, argv)
    healthcheck_urls = URL.findall(" ".join(healthcheck_argv(name)))
    assert [urlsplit(url).port for url in healthcheck_urls] == [expected.port], healthcheck_urls


def test_the_shipped_config_serves_on_every_interface_at_the_published_port() -> None:
    server = shipped_config_with_defaults()["server"]
    published = int(service("proxy")["ports"][0].split(":")[-1])
    assert (str(server["host"]), int(server["port"])) == ("0.0.0.0", published), server


# Each mock's credential settings: unset, the mock accepts any.
MOCK_CREDENTIALS = {"MOCK_CLIENT_ID", "MOCK_CLIENT_SECRET", "MOCK_SUBSCRIPTION_KEY"}
MOCK_CREDENTIALS |= {"MOCK_CALLBACK_SECRET"}


@pytest.mark.parametrize("name", MOCKS, ids=MOCKS)
def test_each_mock_checks_the_credentials_compose_gives_the_proxy(name: str) -> None:
    mock_env, proxy_env = environment(name), environment("proxy")
    checked = MOCK_CREDENTIALS & set(mock_env)
    assert {"MOCK_CLIENT_ID", "MOCK_CLIENT_SECRET"} <= checked, f"{name} checks no credentials"
    for variable in sorted(checked):
        read = CONFIG_REFERENCE.fullmatch(mock_env[variable] or "")
        assert read, f"{name}'s {variable} should come from the proxy's variable, not a literal"
        host_variable = read.group(1)
        assert host_variable in proxy_env, f"{name}'s {variable} reads {host_variable}, unknown"
        proxy_read = CONFIG_REFERENCE.fullmatch(proxy_env[host_variable] or "")
        assert proxy_read, f"the proxy's {host_variable} is a literal, the mock's is not"
        assert proxy_read.group(1) == host_variable, proxy_env[host_variable]
        # The mock's default: none (it accepts any) or the proxy's own.
        proxy_default = compose_default(proxy_env[host_variable])
        assert compose_default(mock_env[variable]) in {None, "", proxy_default}, variable
