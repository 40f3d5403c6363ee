"""The Fargate task's credentials and callbacks, run: real `payagg serve` with the shipped config
and the real mocks, each given what terraform/ecs.tf gives its container (the secrets resolved
to generated stand-ins, the Airtel mock started through its entryPoint launcher), calling back
over real sockets, with the real Redis. `http://127.0.0.1:<port>` stands in for the ALB.

As in tests/test_callbacks_processes.py, the payment is given up on (UNRESOLVED) before its payer
approves, so only an accepted callback can settle it; the mocks, holding the task's credentials,
refuse any others, so their tokens prove the proxy was given the same ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.processes import VENV_BIN, free_port, payagg_serve, running
from tests.terraform_checks.hcl import expression
from tests.test_callbacks_processes import SHIPPED, CallingBack
from tests.test_providers_end_to_end import call
from tests.test_terraform import containers, environment, terraform
from tests.test_terraform_callbacks import GENERATED, heredoc, json_key, secrets

REDIS_DB = 13
APPROVAL_MS = 5000  # the payer approves this long after the request: after payagg gave up
MOCK_PORT = {"mtn": 9101, "airtel": 9102}


def stand_in(key: str) -> str:
    """A value of the kind Terraform generates for `key` (alphanumeric), the same every run."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    return str(uuid.UUID(digest[:32])) if GENERATED[key].startswith("random_uuid") else digest


def resolved_secrets(container: str) -> dict[str, str]:
    """What ECS puts in the container's environment from the providers secret."""
    return {
        name: stand_in(json_key(value_from))
        for name, value_from in secrets(container).items()
        if expression(value_from.rsplit(":", 3)[0]) == "aws_secretsmanager_secret.providers.arn"
    }


def mock_argv(container: str, port: int) -> list[str]:
    """The container's entryPoint and command, on `port`, with the venv's programs."""
    definition = containers()[container]
    entry = [
        heredoc(terraform().locals["airtel_mock_launcher"])
        if expression(part) == "local.airtel_mock_launcher"
        else part
        for part in definition.get("entryPoint", [])
    ]
    command = [str(part) for part in definition["command"]]
    assert command[command.index("--port") + 1] == str(MOCK_PORT[container])
    command[command.index("--port") + 1] = str(port)
    command[0] = str(VENV_BIN / command[0])
    if entry:
        assert entry[0] == "python"
        entry[0] = sys.executable
    return [*entry, *command]


@pytest.fixture(params=["MTN", "AIRTEL"])
def task(request, redis_server) -> Iterator[CallingBack]:
    provider: str = request.param
    mock_name = provider.lower()
    if redis_server.process is None:
        redis_server.start()
    redis_server.client(REDIS_DB).flushdb()
    proxy_port, mock_port = free_port(), free_port()
    proxy, mock = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{mock_port}"
    # The task's public URL is the ALB's; here the proxy itself stands in for it.
    assert expression(environment(containers()["proxy"])["PAYAGG_PUBLIC_URL"]) == (
        "local.public_url"
    )
    public = {"PAYAGG_PUBLIC_URL": proxy}
    proxy_env = {
        **resolved_secrets("proxy"),
        **public,
        f"{provider}_URL": mock,
        "REDIS_URL": redis_server.url_for(REDIS_DB),
        f"{provider}_SYNC_WAIT_S": "0.3",  # answered 202 long before the payer approves
        "PROVIDER_TIMEOUT_S": "2",
        "RECONCILE_GIVE_UP_AFTER_S": "0.1",  # UNRESOLVED at the reconciler's first question
    }
    mock_env = {
        **resolved_secrets(mock_name),
        **{name: public[name] for name in environment(containers()[mock_name]) if name in public},
        "MOCK_SEED": "11",
        "MOCK_APPROVAL_MS": f"{APPROVAL_MS},{APPROVAL_MS}",
    }
    with ExitStack() as processes:
        processes.enter_context(
            running(mock_argv(mock_name, mock_port), f"{mock}/healthz", mock_env)
        )
        serve = payagg_serve(SHIPPED, proxy_port)
        processes.enter_context(running(serve, f"{proxy}/readyz", proxy_env))
        yield CallingBack(provider, proxy, mock)


def test_the_task_settles_a_payment_by_callback_with_the_credentials_it_generated(task):
    transaction_id = task.pay_and_let_payagg_give_up("FARGATE")
    assert task.stats()["callbacks_sent"] == 0, "the payer approved before payagg gave up"

    task.reaches(transaction_id, "SUCCESS")
    after = task.stats()
    assert after["callbacks_sent"] == 1
    assert after["callbacks_failed"] == 0, "payagg refused the mock's callback"
    assert after["tokens_issued"] >= 1
    assert after["unauthorized"] == 0, "the proxy was refused: not the mock's credentials"
    assert (after["requests"], after["charges"], after["duplicates"]) == (1, 1, 0)


def test_the_task_mocks_refuse_credentials_other_than_the_generated_ones(task):
    wrong = base64.b64encode(b"someone:else").decode()
    if task.provider == "MTN":
        headers = {"Authorization": f"Basic {wrong}", "Ocp-Apim-Subscription-Key": "other"}
        reply = call(f"{task.mock}/collection/token/", "POST", b"", headers)
    else:
        grant = {
            "client_id": "someone",
            "client_secret": "else",
            "grant_type": "client_credentials",
        }
        reply = call(f"{task.mock}/auth/oauth2/token", "POST", json.dumps(grant).encode())
    assert reply.status in (400, 401), reply.raw
    assert task.stats()["tokens_issued"] == 0
