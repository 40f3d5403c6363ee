"""The chart of a bench run: each scenario's requests/s as a ratio to each reference, as a PNG.

`make bench` writes it for the run it just measured (bench/ratios.png, shown in the README). It
reads the run's own report, the markdown appended to BENCHMARKS.md, so a chart can be redrawn
from any recorded run:

    .venv/bin/python bench/chart.py BENCHMARKS.md bench/ratios.png   # the latest recorded run
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt

RATIO_PREFIX = "ratio to "


@dataclass(frozen=True)
class Run:
    title: str
    references: list[str]
    ratios: dict[str, list[float]]  # scenario -> one ratio per reference


def latest_run(report: str) -> Run:
    """The last `## ...` section's table of a bench report (BENCHMARKS.md or one run's output)."""
    lines = report.rsplit("\n## ", 1)[-1].splitlines()
    title = lines[0].removeprefix("## ")
    start = next((i for i, line in enumerate(lines) if line.startswith("| scenario |")), None)
    if start is None:
        raise ValueError(f"no results table under {title!r}")
    rows = []
    for line in lines[start:]:  # the results table ends where the targets' table begins
        if not line.startswith("|"):
            break
        rows.append(line)
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    columns = [i for i, name in enumerate(header) if name.startswith(RATIO_PREFIX)]
    ratios = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        ratios[cells[0]] = [float(cells[i]) for i in columns]
    return Run(title, [header[i].removeprefix(RATIO_PREFIX) for i in columns], ratios)


def write_chart(run: Run, path: Path) -> None:
    scenarios = list(run.ratios)
    width = 0.8 / len(run.references)
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=100)
    for index, reference in enumerate(run.references):
        offset = (index - (len(run.references) - 1) / 2) * width
        positions = [position + offset for position in range(len(scenarios))]
        values = [run.ratios[scenario][index] for scenario in scenarios]
        bars = axes.bar(positions, values, width, label=f"ratio to {reference}")
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(scenarios)), scenarios)
    axes.set_ylabel("requests/s ratio (higher is better)")
    axes.set_title(run.title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata: the same figures give the same bytes, so an unchanged chart is no git change.
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: bench/chart.py REPORT.md OUT.png", file=sys.stderr)
        return 2
    write_chart(latest_run(Path(argv[0]).read_text(encoding="utf-8")), Path(argv[1]))
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
