"""``make bench``: run every benchmark that this machine's services allow, write the report.

Outputs:
* ``benchmarks/results/<date>.json``: every row with all repetitions, plus machine info and versions;
* ``benchmarks/RESULTS.md``: the table (median of the repetitions, spread, ratio, target, met or missed);
* ``benchmarks/results/ratios.png``: one bar per row, the ratio against its baseline (1.0 = parity);
* whatever plots the individual benchmarks write (e.g. the S1 block-size figure).

Each ``bench_<name>.py`` defines ``measure(repeats) -> list[Row]``; a benchmark whose services are missing
fails alone and is reported, the others still run. ``--only NAME`` runs a subset; ``--repeats N`` changes
the repetitions (default 3).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import Row, machine_info  # noqa: E402

RESULTS_DIR = HERE / "results"


def discover(only: list[str]) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(name in s.stem for name in only)]
    return scripts


def load(script: Path) -> Any:
    spec = importlib.util.spec_from_file_location(script.stem, script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versions() -> dict[str, str]:
    found = {}
    for name in ["taskstream", "aio-pika", "aiobotocore", "azure-storage-queue", "pyzmq", "orjson", "pydantic"]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def verdict(row: Row) -> str:
    if row.target is None:
        return ""
    return "met" if row.ratio >= row.target else "MISSED"


def write_markdown(rows: list[Row], failures: dict[str, str], info: dict[str, Any], path: Path) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Measured {info['time']} on {info['cores']} cores, Python {info['python']}, {info['platform']}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.",
        "",
        "Each figure is the median of the repetitions; *spread* is (max - min) / median of taskstream's runs.",
        "*Ratio* > 1 means taskstream is better than the baseline measured in the same run (for latencies the",
        "ratio is baseline / taskstream). Regenerate with `make bench`.",
        "",
        "| workload | taskstream | baseline | unit | ratio | target | verdict | baseline is | spread |",
        "|---|---:|---:|---|---:|---:|---|---|---:|",
    ]
    for row in rows:
        target = f"{row.target:.2f}" if row.target is not None else "-"
        lines.append(
            f"| {row.workload} | {row.value:,.1f} | {row.baseline_value:,.1f} | {row.unit} | {row.ratio:.2f} | "
            f"{target} | {verdict(row)} | {row.baseline} | {row.spread:.0%} |"
        )
    if failures:
        lines += ["", "## Benchmarks that could not run here", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in failures.items()]
    lines += ["", "![ratios](results/ratios.png)", ""]
    path.write_text("\n".join(lines))


def plot_ratios(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    labels = [f"{r.workload}\nvs {r.baseline}" for r in rows]
    ratios = [r.ratio for r in rows]
    colors = ["tab:green" if (r.target is None or r.ratio >= r.target) else "tab:red" for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.45 * len(rows))))
    ax.barh(range(len(rows)), ratios, color=colors)
    for i, row in enumerate(rows):
        if row.target is not None:
            ax.plot([row.target, row.target], [i - 0.4, i + 0.4], color="black", linewidth=1)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio against the baseline (> 1: taskstream better; black tick: target)")
    ax.set_title("taskstream against baselines measured in the same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], help="run only benchmarks whose name contains these")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    RESULTS_DIR.mkdir(exist_ok=True)
    info = machine_info() | {"versions": versions()}
    rows: list[Row] = []
    failures: dict[str, str] = {}
    scripts = discover(args.only)
    started = time.perf_counter()
    for index, script in enumerate(scripts, 1):
        name = script.stem.removeprefix("bench_")
        print(f"[{index}/{len(scripts)}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            produced = load(script).measure(repeats=args.repeats)
        except Exception as exc:
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            traceback.print_exc()
            print(f"[{index}/{len(scripts)}] {name} FAILED after {time.perf_counter() - t0:.0f} s", flush=True)
            continue
        rows.extend(produced)
        for row in produced:
            print(f"    {row.workload:<40} ratio {row.ratio:5.2f}  ({row.value:,.1f} vs {row.baseline_value:,.1f} "
                  f"{row.unit})", flush=True)
        print(f"[{index}/{len(scripts)}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)

    stamp = time.strftime("%Y-%m-%d")
    payload = {"machine": info, "rows": [r.to_dict() for r in rows], "failures": failures}
    (RESULTS_DIR / f"{stamp}.json").write_text(json.dumps(payload, indent=2))
    plot_ratios(rows, RESULTS_DIR / "ratios.png")
    write_markdown(rows, failures, info, HERE / "RESULTS.md")
    print(f"wrote benchmarks/RESULTS.md and benchmarks/results/{stamp}.json in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
