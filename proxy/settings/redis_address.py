"""Where Redis is and how to reach it: `redis.url` and the TLS files, checked at config load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class RedisAddress:
    """Where and how to connect: `redis[s]://[[user]:password@]host[:port][/db]`."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_redis_url(url: str) -> RedisAddress:
    """The address a URL names; raises ValueError saying what is wrong (never echoing a password).

    Options in a query string are refused rather than dropped: a `?ssl_cert_reqs=none` that is
    silently ignored would make an operator believe something the client does not do.
    """
    parts = urlsplit(url)
    shown = _without_password(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"must start with redis:// or rediss:// (TLS), got {shown!r}")
    if not parts.hostname:
        raise ValueError(f"names no host, got {shown!r}")
    try:
        port = 6379 if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535, got {shown!r}")
    database = parts.path.lstrip("/")
    if not database.isdecimal() and database:
        raise ValueError(f"the path must be a database number such as /0, got {shown!r}")
    if parts.query or parts.fragment:
        raise ValueError(
            "takes no options after '?' or '#' (set redis.timeout_s, redis.tls_ca_file, ... "
            f"instead), got {shown!r}"
        )
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username and password is None:
        raise ValueError(f"names a user but no password (user:password@host), got {shown!r}")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(database or 0),
        username=username,
        password=password,
        tls=parts.scheme == "rediss",
    )


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    location = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{location}").geturl()


def check_pem_file(path: str) -> None:
    """Raises ValueError unless `path` is a readable PEM file (certificates or a key)."""
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path!r}: {error.strerror or error}") from None
    if b"-----BEGIN " not in text:
        raise ValueError(f"{path!r} is not a PEM file (no -----BEGIN line)")
