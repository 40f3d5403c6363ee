"""`redis.*` in the config: the URL read whole, TLS files and modes checked at load time, so
`payagg check-config` catches what `payagg serve` would otherwise trip over."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trustme

from proxy.settings.config import ConfigError, parse_config
from proxy.settings.redis_address import RedisAddress, parse_redis_url

PAYAGG = str(Path(sys.executable).parent / "payagg")


def address(host: str, **overrides: object) -> RedisAddress:
    fields: dict[str, object] = {
        "port": 6379,
        "db": 0,
        "username": None,
        "password": None,
        "tls": False,
    }
    fields.update(overrides)
    return RedisAddress(host=host, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", address("localhost")),
        ("redis://cache.internal:6380/0", address("cache.internal", port=6380)),
        ("redis://10.0.0.5/3", address("10.0.0.5", db=3)),
        ("redis://[::1]:6390", address("::1", port=6390)),
        ("redis://:s3cret@h/1", address("h", db=1, password="s3cret")),
        (
            "redis://pay%40ments:p%3Ass%2Fw%40rd%25@h:6379/0",
            address("h", username="pay@ments", password="p:ss/w@rd%"),
        ),
        (
            "rediss://default:tok@master.example.cache.amazonaws.com:6379/2",
            address(
                "master.example.cache.amazonaws.com",
                db=2,
                username="default",
                password="tok",
                tls=True,
            ),
        ),
        ("rediss://h", address("h", tls=True)),
    ],
    ids=[
        "defaults",
        "host-and-port",
        "db-in-path",
        "ipv6",
        "password-only",
        "percent-encoded-user-and-password",
        "rediss-elasticache",
        "rediss-defaults",
    ],
)
def test_a_redis_url_names_host_port_database_credentials_and_tls(
    url: str, expected: RedisAddress
) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h", "must start with redis:// or rediss://"),
        ("unix:///var/run/redis.sock", "must start with redis:// or rediss://"),
        ("redis://", "names no host"),
        ("redis://h:port", "the port must be a number from 1 to 65535"),
        ("redis://h:0", "the port must be a number from 1 to 65535"),
        ("redis://h:70000", "the port must be a number from 1 to 65535"),
        ("redis://h/zero", "the path must be a database number"),
        ("redis://h/0?db=5", "takes no options after '?'"),
        ("rediss://h?ssl_cert_reqs=none", "takes no options after '?'"),
        ("redis://h/0#x", "takes no options after '?' or '#'"),
        ("redis://user@h", "names a user but no password"),
    ],
    ids=[
        "http",
        "unix-socket",
        "no-host",
        "port-not-a-number",
        "port-zero",
        "port-too-large",
        "path-not-a-number",
        "query-option",
        "tls-option",
        "fragment",
        "user-without-password",
    ],
)
def test_a_bad_redis_url_is_refused_saying_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_redis_url(url)


def test_a_refused_url_never_shows_its_password() -> None:
    with pytest.raises(ValueError, match=r"'redis://user:\*\*\*@h/0\?x=1'") as refused:
        parse_redis_url("redis://user:hunter2@h/0?x=1")
    assert "hunter2" not in str(refused.value)


def config_with(redis: str) -> str:
    return textwrap.dedent(
        f"""\
        redis: {redis}
        providers:
          CANON: {{url: "http://127.0.0.1:9999/pay"}}
        """
    )


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        parse_config(text, "gw.yaml", {})
    return refused.value.problems


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    client = ca.issue_cert("payagg")
    files = {
        "ca": directory / "ca.pem",
        "cert": directory / "client.pem",
        "key": directory / "client.key",
        "junk": directory / "junk.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    files["junk"].write_text("not a certificate\n")
    return {name: str(path) for name, path in files.items()}


def test_tls_files_cluster_mode_and_wait_replicas_load(pem_files: dict[str, str]) -> None:
    config = parse_config(
        config_with(
            f'{{url: "rediss://default:tok@h:6379", mode: cluster,'
            f' tls_ca_file: "{pem_files["ca"]}", tls_cert_file: "{pem_files["cert"]}",'
            f' tls_key_file: "{pem_files["key"]}",'
            " wait_replicas: 1, durable_retry_s: 5}"
        ),
        "gw.yaml",
        {},
    )
    assert config.redis.mode == "cluster"
    assert config.redis.address.tls
    assert config.redis.wait_replicas == 1


@pytest.mark.parametrize(
    ("redis", "expected"),
    [
        ('{url: "redis://h:99999/0"}', "gw.yaml:1: redis.url: the port must be a number"),
        ('{url: "redis://h/0", mode: sharded}', "gw.yaml:1: redis.mode: input should be"),
        (
            '{url: "redis://h/2", mode: cluster}',
            "gw.yaml:1: redis: Redis Cluster has only database 0",
        ),
        (
            '{url: "redis://h/0", tls_ca_file: "<ca>"}',
            "gw.yaml:1: redis: tls_ca_file, tls_cert_file",
        ),
        (
            '{url: "rediss://h/0", tls_cert_file: "<cert>"}',
            "gw.yaml:1: redis: tls_cert_file and tls_key_file go together",
        ),
        (
            '{url: "rediss://h/0", tls_ca_file: "/no/such.pem"}',
            "gw.yaml:1: redis.tls_ca_file: cannot read '/no/such.pem'",
        ),
        ('{url: "rediss://h/0", tls_ca_file: "<junk>"}', "is not a PEM file"),
        ('{url: "redis://h/0", wait_replicas: -1}', "gw.yaml:1: redis.wait_replicas: must be >= 0"),
    ],
    ids=[
        "port-out-of-range",
        "unknown-mode",
        "cluster-with-a-database",
        "tls-file-without-rediss",
        "certificate-without-key",
        "missing-ca-file",
        "ca-file-not-pem",
        "negative-wait-replicas",
    ],
)
def test_a_bad_redis_section_is_a_config_error_naming_the_key(
    redis: str, expected: str, pem_files: dict[str, str]
) -> None:
    for name, path in pem_files.items():
        redis = redis.replace(f"<{name}>", path)
    reported = problems(config_with(redis))
    assert any(expected in line for line in reported), reported


def test_check_config_refuses_a_bad_redis_url_that_serve_would_have_crashed_on(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(config_with('{url: "redis://cache:637900/0"}'))
    result = subprocess.run([PAYAGG, "check-config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{bad}:1: redis.url: the port must be a number from 1 to 65535" in result.stderr
    assert "Traceback" not in result.stderr
