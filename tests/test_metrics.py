"""The operations metrics: series present from start-up, payagg's own latency, build and process."""

from __future__ import annotations

import hashlib
import platform

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.observability.metrics import OUTCOMES, REVISION_ENV, GatewayMetrics
from tests.conftest import GatewayClient, gateway_yaml, make_config, payment, running_gateway
from tests.test_workers import samples


def labels_of(text: str, name: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_every_breaker_transition_has_a_series_before_the_first_transition() -> None:
    text = GatewayMetrics(["MTN"]).render().decode()

    transitions = {
        (labels["from_state"], labels["to_state"])
        for labels in labels_of(text, "payagg_circuit_breaker_transitions_total")
        if labels["provider"] == "MTN"
    }
    assert {("closed", "open"), ("open", "half_open"), ("half_open", "closed")} <= transitions
    assert ("half_open", "open") in transitions
    assert samples(text, "payagg_circuit_breaker_transitions_total", provider="MTN") == [0] * len(
        transitions
    )


@pytest.mark.parametrize("outcome", OUTCOMES, ids=OUTCOMES)
def test_each_payment_outcome_has_a_latency_series_before_the_first_payment(outcome: str) -> None:
    text = GatewayMetrics(["MTN"]).render().decode()

    counts = samples(
        text, "payagg_request_duration_seconds_count", route="/v1/pay", outcome=outcome
    )
    assert counts == [0]


def test_the_latency_buckets_reach_from_a_millisecond_to_thirty_seconds() -> None:
    text = GatewayMetrics(["MTN"]).render().decode()

    bounds = {
        labels["le"]
        for labels in labels_of(text, "payagg_request_duration_seconds_bucket")
        if labels["outcome"] == "success"
    }
    assert {"0.001", "30.0", "+Inf"} <= bounds


def test_process_metrics_describe_this_process() -> None:
    text = GatewayMetrics(["MTN"]).render().decode()

    for name in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        (value,) = samples(text, name)
        assert value > 0, name


async def test_an_answered_payment_is_timed_under_its_route_and_outcome(
    gateway: GatewayClient,
) -> None:
    assert (await gateway.post("/v1/pay", json=payment("TXN-timed"))).status == 200
    assert (await gateway.post("/v1/pay", json=payment("TXN-timed"))).status == 200
    assert (await gateway.post("/v1/pay", json={"Amount": 1})).status == 400
    assert (await gateway.get("/v1/payments/TXN-timed")).status == 200
    assert (await gateway.get("/nowhere/TXN-timed")).status == 404

    text = (await (await gateway.get("/metrics")).read()).decode()

    def count(route: str, outcome: str) -> list[float]:
        return samples(text, "payagg_request_duration_seconds_count", route=route, outcome=outcome)

    assert count("/v1/pay", "success") == [1]
    assert count("/v1/pay", "replayed") == [1]
    assert count("/v1/pay", "invalid") == [1]
    assert count("/v1/payments/{TransactionID}", "ok") == [1]
    assert count("unmatched", "invalid") == [1]
    (observed,) = samples(
        text, "payagg_request_duration_seconds_sum", route="/v1/pay", outcome="success"
    )
    assert 0 < observed < 30
    routes = {
        labels["route"] for labels in labels_of(text, "payagg_request_duration_seconds_count")
    }
    assert not any("TXN" in route for route in routes), "a label value came from the URL"


async def test_build_info_names_the_version_revision_python_and_the_config_files_hash(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REVISION_ENV, "abc1234")
    text = gateway_yaml("http://127.0.0.1:9/pay", redis_url)
    async with running_gateway(make_config(text)) as client:
        scraped = (await (await client.get("/metrics")).read()).decode()

    (labels,) = labels_of(scraped, "payagg_build_info")
    assert labels["revision"] == "abc1234"
    assert labels["python"] == platform.python_version()
    assert labels["config_hash"] == hashlib.sha256(text.encode()).hexdigest()
    assert labels["version"] not in ("", "unknown")
    assert samples(scraped, "payagg_build_info") == [1]


async def test_build_info_says_unknown_when_no_revision_was_built_in(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REVISION_ENV, raising=False)
    async with running_gateway(
        make_config(gateway_yaml("http://127.0.0.1:9/pay", redis_url))
    ) as client:
        scraped = (await (await client.get("/metrics")).read()).decode()

    (labels,) = labels_of(scraped, "payagg_build_info")
    assert labels["revision"] == "unknown"
