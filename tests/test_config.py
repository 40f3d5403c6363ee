"""Configuration: the shipped file loads; every problem is reported with its file and line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.settings.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.yaml"
PAYAGG = str(Path(sys.executable).parent / "payagg")

VALID = """\
server: {port: 8080}
defaults:
  timeout_s: 5
  breaker: {failure_rate_threshold: 0.6, minimum_calls: 3, window_s: 5, open_s: 30}
providers:
  CANON:
    url: "http://127.0.0.1:9999/pay"
"""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(textwrap.dedent(text), "gw.yaml", environ or {})
    return error.value.problems


def test_the_shipped_config_loads_with_both_providers():
    config = load_config(SHIPPED, environ={})
    assert [provider.name for provider in config.providers] == ["MTN", "AIRTEL"]
    mtn = config.providers[0]
    assert mtn.url == "http://127.0.0.1:9101/collection/v1_0/requesttopay"
    assert mtn.settings.breaker.failure_rate_threshold == 0.6
    assert mtn.settings.breaker.minimum_calls == 3
    assert config.redis.url == "redis://127.0.0.1:6379/0"


def test_environment_variables_replace_references_and_defaults_apply_when_unset():
    config = load_config(
        SHIPPED, environ={"MTN_URL": "http://mtn.internal:80", "BREAKER_OPEN_S": "7"}
    )
    assert config.providers[0].url == "http://mtn.internal:80/collection/v1_0/requesttopay"
    assert config.providers[1].url.startswith("http://127.0.0.1:9102/")
    assert all(provider.settings.breaker.open_s == 7 for provider in config.providers)


def test_408_and_429_count_as_breaker_failures_unless_a_provider_says_otherwise():
    config = parse_config(
        VALID + '  OTHER:\n    url: "http://127.0.0.1:9998/pay"\n'
        "    breaker: {failure_statuses: []}\n",
        "gw.yaml",
        {},
    )
    canon, other = config.providers
    assert canon.settings.breaker.failure_statuses == [408, 429]
    assert canon.mapping.classify(429, b"").outcome == "failure"
    assert other.settings.breaker.failure_statuses == []
    assert other.mapping.classify(429, b"").outcome == "busy"


def test_defaults_are_merged_into_each_provider_and_a_provider_may_override_them():
    config = parse_config(
        VALID + '  OTHER:\n    url: "http://127.0.0.1:9998/pay"\n    breaker: {open_s: 3}\n',
        "gw.yaml",
        {},
    )
    canon, other = config.providers
    assert canon.settings.breaker.open_s == 30
    assert other.settings.breaker.open_s == 3
    assert other.settings.breaker.minimum_calls == 3, "the other defaults still apply"
    assert other.settings.timeout_s == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VALID.replace("server: {port: 8080}", "server: {port: 8080, prot: 1}"),
            "gw.yaml:1: server.prot: unknown key (did you mean 'port'?)",
        ),
        (VALID.replace("timeout_s: 5", "timeout_s: five"), "gw.yaml:3: defaults.timeout_s: "),
        (
            VALID.replace("timeout_s: 5", "timeout_s: -1"),
            "gw.yaml:3: defaults.timeout_s: must be > 0, got -1",
        ),
        (
            VALID.replace("failure_rate_threshold: 0.6", "failure_rate_threshold: 1.5"),
            "gw.yaml:4: defaults.breaker.failure_rate_threshold: must be <= 1, got 1.5",
        ),
        (
            VALID.replace('"http://127.0.0.1:9999/pay"', '"${UPSTREAM_URL}"'),
            "gw.yaml:7: providers.CANON.url: environment variable UPSTREAM_URL is not set and has "
            "no default",
        ),
        ("providers: {}\n", "gw.yaml:1: providers: declares no provider; at least one is needed"),
        (
            VALID.replace('    url: "http://127.0.0.1:9999/pay"\n', "    timeout_s: 2\n"),
            "gw.yaml:6: providers.CANON.url: required key is missing",
        ),
        (
            VALID.replace("minimum_calls: 3", "minimum_calls: 0"),
            "gw.yaml:4: defaults.breaker.minimum_calls: must be >= 1, got 0: with no minimum",
        ),
        (
            VALID.replace("open_s: 30}", "open_s: 30, half_open_max_calls: 5}"),
            "gw.yaml:4: defaults.breaker.half_open_max_calls: must be <= minimum_calls (3), got 5",
        ),
        (
            VALID + "idempotency: {lock_ttl_s: 5}\n",
            "gw.yaml:8: idempotency.lock_ttl_s: must exceed the largest provider timeout",
        ),
        (
            VALID.replace('"http://127.0.0.1:9999/pay"', '"ftp://x/pay"'),
            "gw.yaml:7: providers.CANON.url: must be an http:// or https:// URL with a host",
        ),
        (
            VALID.replace("server: {port: 8080}", "server: {port: 8080}\nserver: {port: 1}"),
            "gw.yaml:2: server: duplicate key",
        ),
        ("providers: [\n", "gw.yaml:2: not valid YAML"),
        (
            VALID + "  canon:\n    url: http://127.0.0.1:1/pay\n",
            "gw.yaml:8: providers.canon: same name as 'CANON': ProviderKey is case-insensitive",
        ),
        (
            VALID.replace("redis", "redis").replace(
                "server: {port: 8080}", 'redis: {url: "http://x"}'
            ),
            "gw.yaml:1: redis.url: must start with redis:// or rediss:// (TLS)",
        ),
        (
            VALID.replace("open_s: 30}", "open_s: 30, failure_statuses: [429, 503]}"),
            "gw.yaml:4: defaults.breaker.failure_statuses.1: must be a 4xx status (every 5xx "
            "counts as a failure already), got 503",
        ),
        (
            VALID + "    breaker: {failure_statuses: 429}\n",
            "gw.yaml:8: providers.CANON.breaker.failure_statuses: input should be a valid list, "
            "got 429",
        ),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "negative-timeout",
        "threshold-outside-0-1",
        "undefined-env-var-without-default",
        "empty-providers",
        "missing-url",
        "minimum-calls-below-1",
        "more-trial-calls-than-minimum-calls",
        "lock-ttl-not-above-timeout",
        "url-not-http",
        "duplicate-key",
        "not-yaml",
        "providers-equal-ignoring-case",
        "redis-url-scheme",
        "failure-status-not-a-4xx",
        "failure-statuses-not-a-list",
    ],
)
def test_each_kind_of_error_is_reported_with_its_line(text, expected):
    reported = problems(text)
    assert any(line.startswith(expected) for line in reported), reported


def test_every_error_is_reported_at_once_in_line_order():
    text = """\
    server: {port: 0}
    defaults:
      timeout_s: -2
    providers:
      CANON:
        url: "ftp://nowhere"
        breakr: {}
    """
    reported = problems(text)
    assert [line.split(":")[1] for line in reported] == ["1", "3", "6", "7"], reported
    assert "breakr: unknown key (did you mean 'breaker'?)" in reported[-1]


def test_the_lock_ttl_rule_is_reported_together_with_the_other_sections_problems():
    reported = problems(VALID.replace("port: 8080", "port: 0") + "idempotency: {lock_ttl_s: 5}\n")
    assert [line.split(":")[1] for line in reported] == ["1", "8"], reported
    assert "idempotency.lock_ttl_s: must exceed the largest provider timeout" in reported[1]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('server:\n  host: "127.0.0.1\n  port: 8080\nproviders: {}\n', 2),
        ("server:\n  host: x\n port: 8080\n  max_body_bytes: 1\n", 3),
    ],
    ids=["unclosed-quote", "bad-indent"],
)
def test_a_yaml_syntax_error_names_the_line_of_the_mistake(text, line):
    reported = problems(text)
    assert reported[0].startswith(f"gw.yaml:{line}: not valid YAML"), reported


def test_mapping_templates_with_unknown_placeholders_are_errors_with_their_line():
    text = (
        VALID
        + textwrap.dedent("""\
        request:
          body: {amount: "{amont}", id: "{reference}"}
        response:
          success: [{status: 200, field: status, equals: OK}]
    """)
        .replace("\n", "\n    ")
        .rstrip()
        + "\n"
    )
    text = text.replace("\nrequest:", "\n    request:")
    reported = problems(text)
    assert any(
        "gw.yaml:9: providers.CANON.request.body.amount: unknown placeholder {amont}" in line
        for line in reported
    ), reported


def test_check_config_prints_a_summary_and_exits_0_for_the_shipped_file():
    result = subprocess.run([PAYAGG, "check-config", str(SHIPPED)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK, 2 provider(s): MTN, AIRTEL")


def test_check_config_prints_every_error_and_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: -1}\nproviders: {}\n")
    result = subprocess.run([PAYAGG, "check-config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"{bad}:1: server.port: must be >= 1, got -1")
    assert lines[1].startswith(f"{bad}:2: providers: declares no provider")
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file_says_so_without_a_traceback(tmp_path):
    result = subprocess.run(
        [PAYAGG, "check-config", str(tmp_path / "nope.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_config_fails_at_start_up_naming_file_key_and_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("window_s: 5", "window_s: -1"))
    result = subprocess.run(
        [PAYAGG, "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"{bad}:4: defaults.breaker.window_s: must be > 0, got -1" in result.stderr


def test_a_problem_inherited_from_defaults_is_reported_once_at_the_defaults_line():
    text = (
        VALID.replace("window_s: 5", "window_sec: 5") + '  OTHER: {url: "http://127.0.0.1:1/pay"}\n'
    )
    reported = problems(text)
    assert reported == [
        "gw.yaml:4: defaults.breaker.window_sec: unknown key (did you mean 'window_s'?)"
    ]


def test_a_provider_override_is_reported_at_the_providers_own_line():
    text = VALID + "    breaker: {open_s: -3}\n"
    assert problems(text) == ["gw.yaml:8: providers.CANON.breaker.open_s: must be > 0, got -3"]


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1:9101/pay", "127.0.0.1:9101"),
        ("https://user:secret@provider.example/pay", "provider.example"),
        ("http://[::1]:8080/pay", "[::1]:8080"),
    ],
    ids=["ip-and-port", "credentials-never-shown", "ipv6"],
)
def test_a_providers_host_never_carries_the_urls_credentials(url, host):
    config = parse_config(VALID.replace('"http://127.0.0.1:9999/pay"', f'"{url}"'), "gw.yaml", {})
    assert config.providers[0].host == host


# Lines 8-13 below VALID's seven: a custom mapping whose Authorization comes from the environment.
WITH_HEADERS = (
    VALID
    + """\
    request:
      headers:
        X-Reference-Id: "{reference}"
        Authorization: "Bearer ${TOKEN}"
      body: {id: "{reference}"}
    response: {success: [{status: 200}]}
"""
)


@pytest.mark.parametrize(
    ("token", "what", "position"),
    [
        ("s3cret-token\n", "a line feed (LF)", 20),
        ("s3cret-token\r\n", "a carriage return (CR)", 20),
        ("s3cret\x00token", "a NUL", 14),
        ("s3cret\nX-Admin: yes", "a line feed (LF)", 14),
    ],
    ids=["trailing-lf", "trailing-crlf", "nul", "an-injected-header"],
)
def test_a_header_value_from_the_environment_with_a_line_break_or_nul_is_a_config_error(
    token, what, position
):
    reported = problems(WITH_HEADERS, {"TOKEN": token})
    assert reported == [
        f"gw.yaml:11: providers.CANON.request.headers.Authorization: the value holds {what} at "
        f"character {position}, which would split the request (from the environment, with a "
        "trailing newline?)"
    ]
    assert "s3cret" not in reported[0], "the value is often a secret: never shown"


def test_a_clean_header_value_from_the_environment_loads():
    config = parse_config(WITH_HEADERS, "gw.yaml", {"TOKEN": "s3cret-token"})
    assert config.providers[0].settings.request is not None


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "CONNECTION"])
def test_a_template_may_not_set_a_header_payagg_writes_itself(name):
    reported = problems(WITH_HEADERS.replace("Authorization", name), {"TOKEN": "t"})
    assert reported == [
        f"gw.yaml:11: providers.CANON.request.headers.{name}: payagg writes {name} itself; a "
        "template may not set Host, Content-Length, Transfer-Encoding, Connection"
    ]


@pytest.mark.parametrize("name", ["X Admin", "X-Admin:", "X-Caf\u00e9", '"X-Admin\\n"'])
def test_a_header_name_that_is_not_an_http_token_is_a_config_error(name):
    reported = problems(WITH_HEADERS.replace("Authorization", name), {"TOKEN": "t"})
    assert len(reported) == 1, reported
    assert reported[0].startswith("gw.yaml:11: providers.CANON.request.headers.")
    assert reported[0].endswith(
        ": is not an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VALID + '    default_payer: "256772123456\\n"\n',
            "gw.yaml:8: providers.CANON.default_payer: must match ^[0-9]{8,15}$, got "
            "'256772123456\\n'",
        ),
        (
            VALID.replace("  CANON:", '  "CANON\\n":'),
            "gw.yaml:6: providers.CANON\n: a provider name is 1-32 letters, digits, _ or -",
        ),
    ],
    ids=["default-payer", "provider-name"],
)
def test_a_config_pattern_refuses_a_trailing_newline(text, expected):
    reported = problems(text)
    assert any(line.startswith(expected) for line in reported), reported


def test_the_client_connection_limits_default_to_10_s_15_s_and_4096_connections():
    server = load_config(SHIPPED, environ={}).server
    assert (server.read_timeout_s, server.keepalive_timeout_s, server.max_connections) == (
        10,
        15,
        4096,
    )
    assert parse_config(VALID, "gw.yaml", {}).server == server.model_copy(update={"port": 8080})


CONNECTION_LIMIT_ERRORS = [
    ("read_timeout_s: 0", "server.read_timeout_s: must be > 0, got 0"),
    ("read_timeout_s: 301", "server.read_timeout_s: must be <= 300, got 301"),
    ("keepalive_timeout_s: -1", "server.keepalive_timeout_s: must be > 0, got -1"),
    ("keepalive_timeout_s: 7200", "server.keepalive_timeout_s: must be <= 3600, got 7200"),
    ("max_connections: 0", "server.max_connections: must be >= 1, got 0"),
    ("max_connections: 600000", "server.max_connections: must be <= 500000, got 600000"),
    ("max_connections: many", "server.max_connections: "),
]


@pytest.mark.parametrize(
    ("setting", "expected"),
    CONNECTION_LIMIT_ERRORS,
    ids=[setting for setting, _ in CONNECTION_LIMIT_ERRORS],
)
def test_client_connection_limits_outside_their_bounds_are_errors_with_their_line(
    setting, expected
):
    text = VALID.replace("server: {port: 8080}", f"server:\n  port: 8080\n  {setting}")
    assert any(line.startswith(f"gw.yaml:3: {expected}") for line in problems(text))


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import trustme

    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("payagg.example")
    files = {
        "ca": directory / "ca.pem",
        "cert": directory / "client.pem",
        "key": directory / "client.key",
        "garbage": directory / "garbage.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    files["garbage"].write_text("not a certificate\n")
    return {name: str(path) for name, path in files.items()}


def tls_config(tls: str, url: str = "https://127.0.0.1:9999/pay") -> str:
    return f'providers:\n  CANON:\n    url: "{url}"\n    tls: {tls}\n'


def test_tls_files_and_the_connection_settings_are_loaded(pems):
    config = parse_config(
        tls_config(
            f'{{ca_file: "{pems["ca"]}", cert_file: "{pems["cert"]}", key_file: "{pems["key"]}"}}'
        )
        + "    keepalive_expiry_s: 5\n    pool_size: 8\n    pool_wait_s: 0.5\n"
        "    connect_timeout_s: 1\n",
        "gw.yaml",
        {},
    )
    settings = config.providers[0].settings
    assert settings.tls is not None
    assert settings.tls.context().verify_mode.name == "CERT_REQUIRED"
    assert (settings.keepalive_expiry_s, settings.pool_size, settings.pool_wait_s) == (5, 8, 0.5)
    assert settings.connect_timeout_s == 1


def test_connection_settings_default_to_the_documented_values():
    settings = parse_config(VALID, "gw.yaml", {}).providers[0].settings
    assert settings.keepalive_expiry_s == 15
    assert (settings.pool_size, settings.pool_wait_s, settings.connect_timeout_s) == (256, 1, 3)
    assert settings.tls is None


@pytest.mark.parametrize(
    ("tls", "url", "expected"),
    [
        (
            '{ca_file: "/nonexistent/ca.pem"}',
            None,
            "gw.yaml:4: providers.CANON.tls.ca_file: '/nonexistent/ca.pem' does not exist",
        ),
        (
            '{ca_file: "GARBAGE"}',
            None,
            "gw.yaml:4: providers.CANON.tls.ca_file: holds no usable CA certificate",
        ),
        (
            '{cert_file: "CA"}',
            None,
            "gw.yaml:4: providers.CANON.tls.cert_file: no usable certificate and private key",
        ),
        ('{key_file: "KEY"}', None, "gw.yaml:4: providers.CANON.tls.key_file: needs `cert_file`"),
        (
            '{ca_file: "CA"}',
            "http://127.0.0.1:9999/pay",
            "gw.yaml:4: providers.CANON.tls: applies to https:// URLs only",
        ),
        (
            '{ca_fle: "CA"}',
            None,
            "gw.yaml:4: providers.CANON.tls.ca_fle: unknown key (did you mean 'ca_file'?)",
        ),
    ],
    ids=["missing-file", "not-a-ca", "cert-without-key", "key-without-cert", "plain-http", "typo"],
)
def test_an_unusable_tls_setting_is_a_config_error_naming_its_key(pems, tls, url, expected):
    for name in ("CA", "GARBAGE", "KEY"):
        tls = tls.replace(f'"{name}"', f'"{pems[name.lower()]}"')
    found = problems(tls_config(tls, url or "https://127.0.0.1:9999/pay"))
    assert len(found) == 1
    assert found[0].startswith(expected), found


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("keepalive_expiry_s: 0", "providers.CANON.keepalive_expiry_s: must be > 0, got 0"),
        ("pool_size: 0", "providers.CANON.pool_size: must be >= 1, got 0"),
        ("pool_wait_s: -1", "providers.CANON.pool_wait_s: must be > 0, got -1"),
        ("connect_timeout_s: 0", "providers.CANON.connect_timeout_s: must be > 0, got 0"),
    ],
)
def test_connection_settings_out_of_range_are_config_errors(line, expected):
    assert problems(VALID + f"    {line}\n") == [f"gw.yaml:8: {expected}"]
