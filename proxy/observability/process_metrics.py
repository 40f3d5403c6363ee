"""`process_*` metrics for `payagg serve --workers N`: the whole task's processes, summed.

prometheus-client's ProcessCollector reads one process's /proc and has no multiprocess mode: in a
worker it would describe whichever worker the scrape happened to reach. This collector reads the
/proc of every live worker and of their supervisor, and answers as one process would: memory,
CPU time, open file descriptors and their limits are summed (what the task uses and may use, so
`open_fds / max_fds` is the processes' average use of their limits), and the start time is the
earliest (when the task started).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.server.workers import is_worker

# prometheus-client names its per-process files `<kind>_<pid>.db` (gauge_livesum_123.db).
_FILE_PID = re.compile(r"_(\d+)\.db$")
_COMBINE: dict[str, Callable[[Iterable[float]], float]] = {
    "process_virtual_memory_bytes": sum,
    "process_resident_memory_bytes": sum,
    "process_cpu_seconds_total": sum,
    "process_open_fds": sum,
    "process_start_time_seconds": min,
    "process_max_fds": sum,
}


class WorkerProcessCollector(Collector):
    """The supervisor's and its live workers' /proc, combined into one set of `process_*`."""

    def __init__(self, metrics_dir: str | None = None, proc: str = "/proc") -> None:
        self._metrics_dir = Path(metrics_dir or os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self._proc = proc

    def collect(self) -> Iterable[Metric]:
        values: dict[str, list[float]] = {}
        documentation: dict[str, str] = {}
        for pid in self.pids():
            collector = ProcessCollector(
                pid=functools.partial(int, pid), proc=self._proc, registry=None
            )
            for family in collector.collect():
                name = family.name + ("_total" if family.type == "counter" else "")
                documentation[name] = family.documentation
                values.setdefault(name, []).extend(sample.value for sample in family.samples)
        for name, found in values.items():
            value = _COMBINE[name](found)
            if name.endswith("_total"):
                yield CounterMetricFamily(name[: -len("_total")], documentation[name], value=value)
            else:
                yield GaugeMetricFamily(name, documentation[name], value=value)

    def pids(self) -> list[int]:
        """The supervisor and each worker that wrote metrics and still runs under it.

        A dead worker's files stay (its counts still count); checking the parent keeps a pid the
        kernel has since given to an unrelated process out of the sums.
        """
        if not is_worker():  # PROMETHEUS_MULTIPROC_DIR set by hand on a single process
            return [os.getpid()]
        supervisor = os.getppid()
        workers = {
            int(match.group(1))
            for path in self._metrics_dir.glob("*.db")
            if (match := _FILE_PID.search(path.name))
        }
        return [supervisor, *sorted(pid for pid in workers if self._parent_of(pid) == supervisor)]

    def _parent_of(self, pid: int) -> int | None:
        try:
            stat = Path(self._proc, str(pid), "stat").read_bytes()
        except OSError:
            return None
        # The command name in parentheses may hold spaces; the fields after it are fixed.
        return int(stat.rsplit(b")", 1)[1].split()[1])
