"""The arena's tables and figures, drawn from ``benchmarks/results/arena.json``."""

from __future__ import annotations

import math
from pathlib import Path

SCORE_NAMES = {
    "accuracy": "validation accuracy ≥",
    "loss": "validation MSE ≤",
    "suboptimality": "training objective − optimum ≤",
    "relative_error": "relative L2 error ≤",
}
TEST_NAMES = {"accuracy": "test accuracy", "loss": "test MSE", "suboptimality": "test loss",
              "relative_error": "test relative L2 error"}  # fmt: skip


def _pm(value, spec: str) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:{spec}} ± {std:{spec}}"


def ranking(entry: dict) -> list[tuple[str, dict]]:
    """Contestants best first: most seeds at target, then fewer seconds, then test metric."""
    higher = entry["score"] == "accuracy"

    def key(item):
        summary = item[1]["summary"]
        if summary is None:
            return (1, 0, math.inf, math.inf)
        seconds = summary["seconds_to_target"]
        test = summary["final_test"]
        test_key = math.inf if test is None else (-test[0] if higher else test[0])
        return (0, -summary["reached"], seconds[0] if seconds else math.inf, test_key)

    return sorted(entry["contestants"].items(), key=key)


def _size(num_bytes: int) -> str:
    return f"{num_bytes} B" if num_bytes < 1024 else f"{num_bytes / 1024:.0f} KiB"


def _rate(value) -> str:
    return "none (automatic)" if value is None else f"{value:g}"


def workload_table(name: str, entry: dict, images: str) -> list[str]:
    """One workload's ranking table in Markdown."""
    test_name = TEST_NAMES[entry["score"]]
    lines = [
        f"### {name}",
        "",
        f"{entry['description']}. Target: {SCORE_NAMES[entry['score']]} {entry['target']:g}.",
        "",
        f"| # | optimizer | lr | at target | steps to target | seconds to target | "
        f"{test_name} | step (ms) | 1st epoch (s) | state | diverged (grid) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    spec = ".3f" if entry["score"] == "accuracy" else ".3g"
    for rank, (cname, c) in enumerate(ranking(entry), 1):
        s = c["summary"]
        grid = f"{c['grid_diverged']}/{len(c['grid'])}"
        if s is None:
            lines.append(f"| {rank} | {cname} | – | – | – | – | – | – | – | – | {grid} |")
            continue
        lines.append(
            f"| {rank} | {cname} | {_rate(c['learning_rate'])} | {s['reached']}/{s['seeds']} | "
            f"{_pm(s['steps_to_target'], '.0f')} | {_pm(s['seconds_to_target'], '.1f')} | "
            f"{_pm(s['final_test'], spec)} | {_pm(s['step_ms'], '.2f')} | "
            f"{_pm(s['first_epoch_seconds'], '.1f')} | {_size(s['state_bytes'])} | "
            f"{s['diverged']}/{s['seeds']} ({grid}) |"
        )
    for cname, reason in entry.get("refused", {}).items():
        lines.append(f"| – | {cname} | refused: {reason.replace('|', '/')} |||||||||")
    lines += ["", f"![{name}]({images}/arena_{name}.png)", ""]
    return lines


def markdown(result: dict, images: str = "images/arena") -> str:
    """The measured part of ``docs/arena.md``."""
    machine = result["machine"]
    lines = [
        f"Measured with `python -m benchmarks --only arena"
        f"{'' if result['mode'] == 'default' else ' --' + result['mode']}` "
        f"({result['mode']} mode, {result['seconds'] / 60:.0f} min) on "
        f"{machine['processor']} ({machine['cpu_count']} cores, "
        f"{', '.join(machine['gpus']) or 'no GPU'}), "
        f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}. "
        f"Rates tried per optimizer: default × 10^{list(result['config']['exponents'])}; "
        f"seeds {list(result['config']['seeds'])}.",
        "",
    ]
    for name, entry in result["workloads"].items():
        lines += workload_table(name, entry, images)
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list[Path]:
    """Validation score against wall time for each contestant's chosen rate, per workload."""
    import matplotlib.pyplot as plt

    files = []
    for name, entry in result["workloads"].items():
        fig, ax = plt.subplots(figsize=(7, 4))
        colors = plt.get_cmap("tab20").colors
        for index, (cname, c) in enumerate(ranking(entry)):
            if not c["runs"]:
                continue
            run = c["runs"][0]
            values = [v if math.isfinite(v) else float("nan") for v in run["val_score"]]
            style = "-" if index % 2 == 0 else "--"
            color = colors[index % len(colors)]
            ax.plot(run["seconds"], values, style, marker=".", label=cname, color=color)
        ax.axhline(entry["target"], color="k", lw=0.8, ls="--")
        ax.set_xlabel("seconds (fit wall time, tracing included; seed 0)")
        ax.set_ylabel(SCORE_NAMES[entry["score"]].rstrip(" ≥≤"))
        if entry["score"] != "accuracy":
            ax.set_yscale("log")
        ax.set_title(name)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = out / f"arena_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
