"""Metrics and logs.

`metrics` is the Prometheus registry (merged across `--workers N`), `process_metrics` every
worker's `process_*`, `logs` the JSON log lines and the request log.

May import: `proxy.errors`, and the breaker's state names (`proxy.providers.breaker`). Everything
else in `proxy` may import it. Never `proxy.devtools` (`make lint` checks it).
"""
