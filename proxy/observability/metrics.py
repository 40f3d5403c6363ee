"""Prometheus metrics of CONTRACT §4, in a registry owned by the application."""

from __future__ import annotations

import itertools
import os
import platform
from collections.abc import Iterable
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from proxy.errors import REQUEST_OUTCOMES
from proxy.observability.labels import OPEN_CLIENT, UNKNOWN_CLIENT
from proxy.observability.process_metrics import WorkerProcessCollector
from proxy.providers.breaker import BreakerState

# The `_created` timestamps double the scrape size and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

UNKNOWN_PROVIDER = "unknown"
# One series per outcome an answer can carry: the error classes can name no other.
OUTCOMES: tuple[str, ...] = REQUEST_OUTCOMES
WEBHOOK_RESULTS = ("delivered", "failed", "expired")
RELOAD_RESULTS = ("ok", "invalid", "refused")
# payagg's own answers: from a sub-millisecond replay or 503 to a payment on a slow provider.
_ANSWER_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30,
)  # fmt: skip
PAY_ROUTE = "/v1/pay"
# Set from the Dockerfile's REVISION build argument: the git commit the image was built from.
REVISION_ENV = "PAYAGG_REVISION"
# Results of one status query by the reconciler.
POLL_RESULTS = ("success", "declined", "pending", "not_found", "failed", "busy", "breaker_open")
# From an instant approval to a payer who approves after minutes, or a day of reconciling.
_FINAL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 21600, 86400)
# Payments are seconds-scale at worst; the low buckets show the proxy's own overhead.
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    """Every series is created up front, so a scrape shows zeros rather than missing series."""

    def __init__(
        self,
        providers: Iterable[str],
        registry: CollectorRegistry | None = None,
        clients: Iterable[str] = (OPEN_CLIENT,),
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "payagg_requests_total",
            "Payment requests answered, by provider, outcome and client.",
            ["provider", "outcome", "client"],
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "payagg_upstream_request_duration_seconds",
            "Time spent waiting for the provider's answer.",
            ["provider"],
            buckets=_UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "payagg_circuit_breaker_state",
            "1 for the breaker's current state, 0 for the others (summed over workers).",
            ["provider", "state"],
            registry=self.registry,
            # With `--workers N` each worker has its own breaker: the gauge counts the workers
            # in each state; with one worker it is exactly 1 or 0.
            multiprocess_mode="livesum",
        )
        self.breaker_transitions = Counter(
            "payagg_circuit_breaker_transitions_total",
            "Circuit breaker state changes.",
            ["provider", "from_state", "to_state"],
            registry=self.registry,
        )
        self.provider_mismatches = Counter(
            "payagg_provider_mismatch",
            "Provider answers whose amount or currency differs from the request (never a 200).",
            ["provider"],
            registry=self.registry,
        )
        self.unrecognised_status = Counter(
            "payagg_status_unrecognised",
            "Status answers that matched no rule: the payment was left pending, never failed.",
            ["provider"],
            registry=self.registry,
        )
        self.store_errors = Counter(
            "payagg_idempotency_store_errors_total",
            "Redis calls that failed or timed out.",
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "payagg_connections_refused_total",
            "Client connections closed at once because server.max_connections were open.",
            registry=self.registry,
        )
        self.unknown_store_outcomes = Counter(
            "payagg_idempotency_unknown_outcomes_total",
            "Stores and releases of a payment's record that Redis did not confirm: applied or not.",
            ["action"],
            registry=self.registry,
        )
        for action in ("store", "release"):
            self.unknown_store_outcomes.labels(action)
        # Children resolved once: `labels()` on every request costs more than the increment.
        self._request_counters: dict[tuple[str, str, str], Counter] = {}
        self._providers: list[str] = [UNKNOWN_PROVIDER]
        self._clients: list[str] = []
        self.add_clients((*clients, UNKNOWN_CLIENT))

        self._build_labels: tuple[str, ...] | None = None  # the build_info series shown
        self._add_operations_metrics()
        self._add_webhook_metrics()
        self._add_lifecycle_metrics()
        self._add_admin_metrics()
        self.add_providers(providers)

    def add_providers(self, providers: Iterable[str]) -> None:
        """Every series of these providers, created before their first request (at start-up,
        and for the providers a config reload adds)."""
        for provider in providers:
            if provider in self._providers:
                continue
            self._providers.append(provider)
            self._add_request_counters([provider], self._clients)
            self.upstream_duration.labels(provider)
            self.provider_mismatches.labels(provider)
            self.unrecognised_status.labels(provider)
            self.show_state(provider, BreakerState.CLOSED)
            for before, after in itertools.permutations(BreakerState, 2):
                self.breaker_transitions.labels(provider, before.value, after.value)
            self.payments_pending.labels(provider)
            self.unresolved_payments.labels(provider)
            self.time_to_final.labels(provider)
            self.reconcile_conflicts.labels(provider)
            for result in POLL_RESULTS:
                self.reconcile_polls.labels(provider, result)
            self.show_forced(provider, None)

    def add_clients(self, clients: Iterable[str]) -> None:
        """The request counters of these clients (at start-up, and for clients a reload adds)."""
        added = [client for client in clients if client not in self._clients]
        self._clients += added
        self._add_request_counters(self._providers, added)

    def _add_request_counters(self, providers: Iterable[str], clients: list[str]) -> None:
        for provider in providers:
            for outcome in OUTCOMES:
                for client in clients:
                    key = (provider, outcome, client)
                    self._request_counters[key] = self.requests.labels(*key)

    def count(self, provider: str, outcome: str, client: str) -> None:
        self._request_counters[provider, outcome, client].inc()

    def show_state(self, provider: str, current: BreakerState) -> None:
        for state in BreakerState:
            self.breaker_state.labels(provider, state.value).set(1 if state is current else 0)

    def on_transition(self, provider: str, before: BreakerState, after: BreakerState) -> None:
        self.breaker_transitions.labels(provider, before.value, after.value).inc()
        self.show_state(provider, after)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Every worker's values, merged from the files prometheus-client keeps per process.
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            merged.register(WorkerProcessCollector())
            return generate_latest(merged)
        return generate_latest(self.registry)

    # --- operations: what the dashboard and the alert rules in ops/ read ----------------------

    def _add_operations_metrics(self) -> None:
        self.request_duration = Histogram(
            "payagg_request_duration_seconds",
            "Time from a request's arrival to payagg's answer, by route and outcome.",
            ["route", "outcome"],
            buckets=_ANSWER_BUCKETS,
            registry=self.registry,
        )
        self._answer_histograms: dict[tuple[str, str], Histogram] = {}
        for outcome in OUTCOMES:
            self.observe_answer(PAY_ROUTE, outcome, None)
        self.build_info = Gauge(
            "payagg_build_info",
            "Always 1; the labels say which build and which config file answer.",
            ["version", "revision", "python", "config_hash"],
            registry=self.registry,
            # Every worker runs the same build and file: one series, dropped with a dead worker.
            multiprocess_mode="livemax",
        )
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # With workers, render() reads every worker's /proc instead (see process_metrics).
            ProcessCollector(registry=self.registry)

    # --- the payment lifecycle ---------------------------------------------------------------

    def _add_lifecycle_metrics(self) -> None:
        # Read from the store at scrape: every process shows the same, right, value.
        self.payments_pending = Gauge(
            "payagg_payments_pending",
            "Payments not final (PROCESSING or PENDING), read from the store.",
            ["provider"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.unresolved_payments = Gauge(
            "payagg_unresolved_payments",
            "Payments UNRESOLVED (an operator must look), read from the store.",
            ["provider"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.reconcile_polls = Counter(
            "payagg_reconcile_polls_total",
            "Status queries made to settle payments, by provider and result.",
            ["provider", "result"],
            registry=self.registry,
        )
        self.time_to_final = Histogram(
            "payagg_payment_time_to_final_seconds",
            "Time from a payment's first claim to its final state.",
            ["provider"],
            buckets=_FINAL_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_conflicts = Counter(
            "payagg_reconcile_conflicts_total",
            "Reports contradicting a settled payment (logged at ERROR; nothing changed).",
            ["provider"],
            registry=self.registry,
        )

    def show_build(self, config_hash: str) -> None:
        """Say which config file this process runs; after a reload, the old one's series goes."""
        labels = (
            package_version(),
            os.environ.get(REVISION_ENV) or "unknown",
            platform.python_version(),
            config_hash,
        )
        shown = self._build_labels
        if shown is not None and shown != labels:
            # Zeroed first: with --workers the value lives on in this process's file after
            # remove(), and a 0 never wins the livemax merge over another worker's 1.
            self.build_info.labels(*shown).set(0)
            self.build_info.remove(*shown)
        self._build_labels = labels
        self.build_info.labels(*labels).set(1)

    def observe_answer(self, route: str, outcome: str, seconds: float | None) -> None:
        """Record one answer's latency; `seconds=None` only creates the series."""
        histogram = self._answer_histograms.get((route, outcome))
        if histogram is None:
            histogram = self.request_duration.labels(route, outcome)
            self._answer_histograms[route, outcome] = histogram
        if seconds is not None:
            histogram.observe(seconds)

    # --- the admin API (proxy/admin/) ---------------------------------------------------------

    def _add_admin_metrics(self) -> None:
        self.config_reloads = Counter(
            "payagg_config_reloads_total",
            "Config reloads by result: ok (applied), invalid (errors in the file), refused "
            "(pending payments at a provider it removes or re-targets); counted by each process.",
            ["result"],
            registry=self.registry,
        )
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        self.breaker_forced = Gauge(
            "payagg_circuit_breaker_forced",
            "1 while an operator holds the provider's breaker in this state, else 0.",
            ["provider", "state"],
            registry=self.registry,
            # Every process reads the same forced states from Redis.
            multiprocess_mode="livemax",
        )

    def show_forced(self, provider: str, forced: BreakerState | None) -> None:
        for state in (BreakerState.OPEN, BreakerState.CLOSED):
            self.breaker_forced.labels(provider, state.value).set(1 if state is forced else 0)

    # --- merchant webhooks ----------------------------------------------------------------------

    def _add_webhook_metrics(self) -> None:
        self.webhook_deliveries = Counter(
            "payagg_webhook_deliveries_total",
            "Merchant webhook attempts: delivered (2xx), failed (will retry), expired (given up).",
            ["result"],
            registry=self.registry,
        )
        for result in WEBHOOK_RESULTS:
            self.webhook_deliveries.labels(result)
        self.webhook_backlog = Gauge(
            "payagg_webhook_backlog",
            "Merchant webhooks not yet delivered, read from the store at each scrape.",
            registry=self.registry,
            # Every process reads the same store: the latest reading is right for all of them.
            multiprocess_mode="livemostrecent",
        )


def package_version() -> str:
    try:
        return metadata.version("payagg")
    except metadata.PackageNotFoundError:
        return "unknown"
