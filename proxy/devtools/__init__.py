"""The local stack and the demo: `payagg dev` (`devstack`, which watches `make dev` through
`supervisor_watch`) and `payagg demo` (`demo`).

May import anything in `proxy` but `proxy.cli`. Only `proxy.cli` imports it, and the local-stack
supervisor only inside `payagg dev`, so `payagg serve` never loads it (`make lint` and
`tests/test_layout.py` check both).
"""
