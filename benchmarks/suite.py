"""The benchmark suite: ``python -m benchmarks [--quick | --full]`` (or ``make bench``).

Runs, in one process, the cost section (:mod:`benchmarks.cost`), the estimator
accuracy section (:mod:`benchmarks.accuracy`) and the training section
(:mod:`benchmarks.training`), then writes

* ``benchmarks/results/suite.json``: every number measured;
* ``benchmarks/results/*.png``: the plots (copied to ``docs/images/benchmarks/``);
* the measured part of ``docs/benchmarks.md``, between ``<!-- suite:begin -->`` and
  ``<!-- suite:end -->`` (the hand-written text around it stays).

``--only cost,accuracy`` runs some sections; ``--from-json`` redraws the plots and the
docs from an earlier ``suite.json`` without measuring anything. ``--only arena`` runs the
optimizer arena instead (:mod:`benchmarks.arena`: its own ``arena.json`` and
``docs/arena.md``; about an hour, ``--quick`` a few minutes); the arena never runs
unless asked for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
DOC_IMAGES = ROOT / "docs" / "images" / "benchmarks"
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
SECTIONS = ("cost", "accuracy", "training")

# mode -> keyword arguments of each section. "smoke" is the test's tiny configuration.
MODES = {
    "smoke": {
        "cost": dict(models=("mlp",), classes=(10,), batch=16, steps=2, repeats=1,
                     callback_epochs=2, budget_epochs=1),
        "accuracy": dict(hidden=4, seeds=1, budgets=(3, 6)),
        "reference_check": dict(problems=("mnist1d_logreg",), steps=40),
        "time_to_target": dict(problems=("digits_cnn",), names=("sgd",), seeds=1, epochs=1,
                               cnn_optimizers=()),
        "batch_size_study": dict(batch_sizes=(4000,), epochs=1),
        "calibration": dict(variants=("csn_paper",), epochs=1, every=40, dense=2, probe=64),
    },
    "quick": {
        "cost": dict(models=("mlp", "small_cnn"), classes=(10, 100), batch=32, steps=4,
                     repeats=2, callback_epochs=2, callback_max_classes=10,
                 budget_epochs=5),
        "accuracy": dict(hidden=16, seeds=3),
        "reference_check": dict(steps=1200),
        "time_to_target": dict(seeds=1, epochs=6, cnn_epochs=6, cnn_seeds=1),
        "batch_size_study": dict(batch_sizes=(128, 4000), epochs=5),
        "calibration": dict(epochs=1, every=9, dense=12),
    },
    "default": {
        "cost": dict(models=("mlp", "small_cnn", "resnet9_w4"), classes=(10, 100), batch=32,
                     steps=4, repeats=2, callback_epochs=2, callback_max_classes=10,
                     budget_epochs=20),
        "accuracy": dict(hidden=16, seeds=5),
        "reference_check": dict(steps=6000),
        "time_to_target": dict(seeds=3, epochs={"digits_cnn": 15, "mnist1d_logreg": 10,
                                                "mnist1d_mlp": 25},
                               cnn_epochs=20, cnn_seeds=3,
                               cnn_optimizers=("sgd_momentum", "adam", "csn_gn")),
        "batch_size_study": dict(batch_sizes=(64, 256, 1000, 4000), epochs=15),
        "calibration": dict(epochs=2, every=10, dense=10),
    },
    "full": {
        "cost": dict(models=("mlp", "small_cnn", "resnet9_w4", "resnet9_w8"), classes=(10, 100),
                     batch=128, steps=10, repeats=5, callback_epochs=3, budget_epochs=100),
        "accuracy": dict(hidden=32, seeds=10),
        "reference_check": dict(steps=6000),
        "time_to_target": dict(seeds=3, epochs=40, cnn_epochs=100,
                               cnn_optimizers=("sgd", "sgd_momentum", "adam", "adahessian",
                                               "csn_paper", "csn_gn", "csn_gn_exact")),
        "batch_size_study": dict(batch_sizes=(32, 128, 512, 1000, 4000), epochs=50),
        "calibration": dict(epochs=5, every=9, dense=20),
    },
}  # fmt: skip


def run(mode: str = "default", sections=SECTIONS, log=print) -> dict:
    """Measures the chosen sections with the settings of ``mode``; returns the results dict."""
    from benchmarks import accuracy, cost, training
    from benchmarks.hvp_cost import machine_info

    config = MODES[mode]
    result = {"mode": mode, "config": config, "machine": machine_info(), "seconds": {}}
    steps = {
        "cost": lambda: {"cost": cost.run(**config["cost"], log=log)},
        "accuracy": lambda: {"accuracy": accuracy.run(**config["accuracy"], log=log)},
        "training": lambda: {
            "reference_check": training.reference_check(**config["reference_check"], log=log),
            "time_to_target": training.time_to_target(**config["time_to_target"], log=log),
            "batch_size_study": training.batch_size_study(**config["batch_size_study"], log=log),
            "calibration": training.calibration(**config["calibration"], log=log),
        },
    }
    for section in sections:
        log(f"[{section}]")
        start = time.perf_counter()
        result.update(steps[section]())
        result["seconds"][section] = time.perf_counter() - start
        log(f"[{section}] {result['seconds'][section]:.0f} s")
    result["onednn"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if hasattr(os, "getloadavg"):
        result["load_average"] = list(os.getloadavg())
    return result


# ------------------------------------------------------------------ plots


def plot(result: dict, out: Path) -> list[Path]:
    """Draws the suite's figures into ``out``; returns the files written."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)  # docs require images >= 600 px wide
        plt.close(fig)
        files.append(path)

    if "cost" in result:
        rows = result["cost"]["rows"]
        keys = [
            ("hvp_over_grad", "HVP / gradient"),
            ("adahessian_over_adam", "AdaHessian step / Adam step"),
            ("csn_over_sgd", "CSN (paper) step / SGD step"),
            ("csn_gauss_newton_over_sgd", "CSN (Gauss-Newton) step / SGD step"),
            ("callback_measurement_over_sgd_step", "callback measurement / SGD step"),
        ]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
        for ax, (key, title) in zip(axes, keys):
            for c in sorted({r["num_classes"] for r in rows}):
                pts = sorted((r["num_params"], r[key], r["model"]) for r in rows
                             if r["num_classes"] == c)  # fmt: skip
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"C={c}")
                for p in pts:
                    ax.annotate(p[2], (p[0], p[1]), fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)
        save(fig, "cost_ratios.png")

    if "accuracy" in result:
        acc = result["accuracy"]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
        for method, rows in acc["eigen"].items():
            hvps = [r["hvps"] for r in rows]
            axes[0].plot(hvps, [max(r["eigenvalue_max_rel_err"], 1e-16) for r in rows], "o-",
                         label=method)  # fmt: skip
            axes[1].plot(hvps, [max(1 - r["eigenvector_mean_abs_cos"], 1e-16) for r in rows],
                         "o-", label=method)  # fmt: skip
        for method, rows in acc["trace"].items():
            axes[2].plot([r["hvps"] for r in rows], [r["rel_err"] for r in rows], "o-",
                         label=method)  # fmt: skip
        for method, rows in acc["diagonal"].items():
            axes[3].plot([r["hvps"] for r in rows], [r["rel_err"] for r in rows], "o-",
                         label=method)  # fmt: skip
        titles = [f"top-{acc['k']} eigenvalues: max rel. error", "eigenvectors: 1 - mean |cos|",
                  "trace: rel. error", "diagonal: rel. l2 error"]  # fmt: skip
        for ax, title in zip(axes, titles):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("Hessian-vector products")
            ax.set_title(f"{title} (dim {acc['dim']})", fontsize=9)
            ax.legend(fontsize=8)
        save(fig, "estimator_accuracy.png")

    if "batch_size_study" in result:
        runs = result["batch_size_study"]["runs"]
        fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.2), squeeze=False)
        for ax, (batch, row) in zip(axes[0], runs.items()):
            for name, losses in row["loss"].items():
                finite = [v if math.isfinite(v) and v < 1e3 else float("nan") for v in losses]
                ax.plot(range(1, len(finite) + 1), finite, label=name)
            ax.set_yscale("log")
            ax.set_title(f"MNIST-1D, batch {batch}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("training loss")
            ax.legend(fontsize=8)
        save(fig, "batch_size_study.png")

    if "calibration" in result:
        runs = result["calibration"]["runs"]
        fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.4))
        for name, rows in runs.items():
            ok = [r for r in rows if r["finite"]]
            steps = [r["step"] for r in ok]
            ratio = [
                sorted(a / b for a, b in zip(r["lambda"], r["gn_quotient"]) if b > 0) for r in ok
            ]
            med = [v[len(v) // 2] if v else float("nan") for v in ratio]
            low = [v[0] if v else float("nan") for v in ratio]
            (line,) = axes[0].plot(steps, med, "o-", label=f"{name} median over k")
            axes[0].plot(steps, low, ":", color=line.get_color(), label=f"{name} min over k")
            axes[1].plot(steps, [r["assignment_cosine"] for r in ok], "o-", label=name)
            loss = [r["loss"] if math.isfinite(r["loss"]) and r["loss"] < 1e6 else float("nan")
                    for r in rows]  # fmt: skip
            axes[2].plot([r["step"] for r in rows], loss, "o-", ms=3, label=name)
            bad = [r["step"] for r in rows if not r["finite"]]
            if bad:
                for ax in axes:
                    ax.axvline(bad[0], color=line.get_color(), ls="--", lw=0.8)
        axes[0].axhline(1.0, color="k", lw=0.6)
        axes[0].set_yscale("log")
        axes[2].set_yscale("log")
        axes[0].set_title("lambda_k / (v_k^T G v_k)  (<1: Newton step too long)", fontsize=9)
        axes[1].set_title("mean |cos|, class directions vs top-C Hessian eigvecs", fontsize=9)
        axes[2].set_title("training loss (running mean); dashed: first non-finite", fontsize=9)
        for ax in axes:
            ax.set_xlabel("training step (digits, small_cnn)")
            ax.legend(fontsize=7)
        save(fig, "csn_calibration.png")
    return files


# ------------------------------------------------------------------ docs


def _fmt(value, spec=".2f", missing="–"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def markdown(result: dict, images: str = "images/benchmarks") -> str:
    """The measured section of ``docs/benchmarks.md``, generated from ``result``."""
    m = result["machine"]
    device = ", ".join(m["gpus"]) or f"{m['cpu_count']}-core CPU, no GPU"
    lines = [
        "_Generated by `python -m benchmarks"
        + ("" if result["mode"] == "default" else f" --{result['mode']}")
        + "`; do not edit by hand between the suite markers._",
        "",
        f"**Machine:** {device} ({m['processor']}), TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}, Python {m['python']}, "
        + ("oneDNN off (`TF_ENABLE_ONEDNN_OPTS=0`)" if result.get("onednn") == "0" else "oneDNN on")
        + "; shared with other jobs "
        f"(load average at the end {_fmt((result.get('load_average') or [None])[0], '.1f')}). "
        f"Mode `{result['mode']}`; sections took "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
        + ".",
        "",
    ]
    if "cost" in result:
        c = result["cost"]
        lines += [
            "### Cost ratios across model sizes and class counts",
            "",
            f"Synthetic {tuple(c['input_shape'])} inputs, batch {c['rows'][0]['batch']}, graph "
            "mode; step times are the fastest interleaved epoch per optimizer, HVP and gradient "
            "the median of interleaved calls. The callback column is one warm measurement of "
            "`HessianSpectrum` + `SubspaceAlignment` (`every_n_epochs=1`, `top_k = C`, probe = "
            "one batch).",
            "",
            "| model | C | params | HVP / grad | AdaHessian / Adam | CSN paper / SGD "
            "| CSN GN / SGD | callbacks s / measurement (SGD steps) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['model']} | {r['num_classes']} | {r['num_params']:,} | "
                f"{r['hvp_over_grad']:.2f} | {r['adahessian_over_adam']:.2f} | "
                f"{r['csn_over_sgd']:.2f} | {r['csn_gauss_newton_over_sgd']:.2f} | "
                + (
                    f"{r['callback_measurement_s']:.2f} s "
                    f"({r['callback_measurement_over_sgd_step']:.0f}) |"
                    if math.isfinite(r["callback_measurement_s"])
                    else "not measured in this mode |"
                )
            )
        b = c["budget_schedule"]
        if c.get("skipped"):
            lines += [
                "",
                "Not measured in this mode (time): "
                + ", ".join(f"{name} at C = {num}" for name, num in c["skipped"])
                + ".",
            ]
        lines += [
            "",
            f"Budget schedule (`max_overhead={b['target']}`, digits, `small_cnn`, "
            f"{b['epochs']} epochs, fastest of {b.get('repeats', 1)} interleaved fits each): "
            f"plain {b['plain_s']:.1f} s, with both callbacks "
            f"{b['callbacks_s']:.1f} s, overhead {100 * b['overhead']:+.1f} %, "
            f"{b['measurements']} measurements.",
            "",
            f"![cost ratios]({images}/cost_ratios.png)",
            "",
        ]
    if "accuracy" in result:
        a = result["accuracy"]
        lines += [
            "### Estimator accuracy against the dense Hessian",
            "",
            f"A float64 64-{a['hidden']}-10 tanh MLP trained 2 epochs on digits, Hessian of the "
            f"mean loss on 512 samples (dim {a['dim']}); oracle: dense matrix + `eigh` "
            f"({a['oracle_seconds']:.0f} s), top eigenvalue {a['oracle_top'][0]:.3f}, "
            f"10th {a['oracle_top'][-1]:.3f}, smallest {a['oracle_min']:.3f}, trace "
            f"{a['oracle_trace']:.3f}. Eigensolvers run with a tolerance too small to stop "
            "them, so the budget is their iteration cap.",
            "",
            "| method | HVPs | top-10 eigenvalue max rel. error | eigenvector mean abs cos "
            "| min abs cos |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method, rows in a["eigen"].items():
            for r in rows:
                lines.append(
                    f"| {method} | {r['hvps']} | {r['eigenvalue_max_rel_err']:.1e} | "
                    f"{r['eigenvector_mean_abs_cos']:.4f} | {r['eigenvector_min_abs_cos']:.4f} |"
                )
        lines += [
            "",
            f"Trace and diagonal (mean relative error over {a['seeds']} seeds; the library has "
            "no Hutch++ diagonal estimator, so the diagonal is Hutchinson only):",
            "",
            "| HVPs | trace, Hutchinson | trace, Hutch++ | diagonal, Hutchinson |",
            "| --- | --- | --- | --- |",
        ]
        for h, p, d in zip(a["trace"]["hutchinson"], a["trace"]["hutch++"],
                           a["diagonal"]["hutchinson"]):  # fmt: skip
            lines.append(
                f"| {h['hvps']} | {h['rel_err']:.1e} | {p['rel_err']:.1e} | {d['rel_err']:.2f} |"
            )
        lines += ["", f"![estimator accuracy]({images}/estimator_accuracy.png)", ""]
    if "reference_check" in result:
        ref = result["reference_check"]
        lines += [
            "### MNIST-1D reference check",
            "",
            f"The MNIST-1D models trained as the dataset's authors did (Adam, lr "
            f"{ref['learning_rate']:g}, batch {ref['batch']}, {ref['steps']} steps = "
            f"{ref['epochs']} epochs, seed 0; test accuracy after every epoch) against the "
            'published test accuracies. Data: `load_dataset("mnist1d")`, the generator\'s '
            "default arguments (5000 samples, 4000 train / 1000 test, stratified split).",
            "",
            "| model | params | published | final test acc. | best test acc. | seconds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for problem, row in ref["rows"].items():
            published = row["published"]
            lines.append(
                f"| {problem} | {row['params']:,} | "
                + ("–" if published is None else f"{published:.0%}")
                + f" | {row['final_test_accuracy']:.3f} | {row['best_test_accuracy']:.3f} | "
                f"{row['seconds']:.0f} |"
            )
        lines.append("")
    if "time_to_target" in result:
        lines += [
            "### Time to a target test accuracy",
            "",
            "Epochs and wall time (from the start of `fit`, tracing and per-epoch test "
            "evaluation included) until the test accuracy first reaches the target; mean ± "
            'std over the seeds that reached it. "not reached" means no seed did within the '
            "epoch budget; the best test accuracy is mean ± std over all seeds. A run stops "
            "early as diverged once its loss is non-finite or above 1e4. The MNIST-1D CNN runs "
            "a subset of the optimizers, for time.",
            "",
        ]
        for problem, entry in result["time_to_target"].items():
            lines += [
                f"**{problem}** (target {entry['target']:.0%}, batch {entry['batch']}, "
                f"at most {entry['epochs']} epochs):",
                "",
                "| optimizer | reached | epochs | seconds | best test acc. | diverged |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for name, s in entry.items():
                if not isinstance(s, dict):
                    continue
                reached = s["reached"] > 0
                lines.append(
                    f"| {name} | {s['reached']}/{s['seeds']} | "
                    + (
                        f"{s['reached_epoch_mean']:.1f} ± {s['reached_epoch_std']:.1f} | "
                        f"{s['reached_seconds_mean']:.1f} ± {s['reached_seconds_std']:.1f} | "
                        if reached
                        else "not reached | – | "
                    )
                    + f"{s['best_test_accuracy_mean']:.3f} ± {s['best_test_accuracy_std']:.3f} | "
                    f"{s['diverged']} |"
                )
            lines.append("")
    if "batch_size_study" in result:
        b = result["batch_size_study"]
        lines += [
            "### Batch-size study (the paper's Fig. 2, on MNIST-1D)",
            "",
            f"MLP 40-100-100-10, {b['epochs']} epochs, training loss per epoch (Keras's running "
            "mean); SGD and CSN-paper at lr 1e-2 with momentum 0.9 (the paper's setting), "
            "CSN-GN with its calibrated preset. Crossover: the first epoch from which SGD's "
            "loss stays below CSN's (1 = SGD never behind; – = SGD never ahead for good).",
            "",
            "| batch | SGD final loss | CSN paper final loss | CSN GN final loss "
            "| crossover (paper) | crossover (GN) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for batch, row in b["runs"].items():
            loss = row["loss"]
            lines.append(
                f"| {batch} | {loss['sgd'][-1]:.3f} | {_fmt(loss['csn_paper'][-1], '.3g')} | "
                f"{_fmt(loss['csn_gn'][-1], '.3f')} | {_fmt(row['crossover_paper'], 'd')} | "
                f"{_fmt(row['crossover_gn'], 'd')} |"
            )
        lines += [
            "",
            "Crossover in batch size (the smallest batch from which CSN's final loss is below "
            "SGD's at every larger batch; – = not even at the largest): paper "
            f"{_fmt(b.get('batch_crossover_csn_paper'), 'd')}, GN "
            f"{_fmt(b.get('batch_crossover_csn_gn'), 'd')}.",
            "",
            f"![batch-size study]({images}/batch_size_study.png)",
            "",
        ]
    if "calibration" in result:
        cal = result["calibration"]
        lines += [
            "### λ calibration and alignment during CSN training",
            "",
            f"Digits, `small_cnn`, every step for the first {cal.get('dense', 0)} steps, then "
            f"every {cal['every']} steps: the optimizer's λ_k against the "
            f"Gauss–Newton Rayleigh quotient v_kᵀGv_k on {cal['probe']} probe samples "
            "(`GGNOperator`), and the mean |cos| of the optimal assignment between the class "
            "directions and the top-C Hessian eigenvectors (`best_assignment`).",
            "",
            "| variant | records | median λ/quotient (first → last) | smallest λ/quotient "
            "| assignment cos (first → last) | first non-finite step | loss at step 1 → "
            "last finite record |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, rows in cal["runs"].items():
            ok = [r for r in rows if r["finite"]]
            ratios = [
                sorted(x / q for x, q in zip(r["lambda"], r["gn_quotient"]) if q > 0) for r in ok
            ]
            med = [v[len(v) // 2] for v in ratios if v]
            low = min((v[0] for v in ratios if v), default=None)
            cos = [r["assignment_cosine"] for r in ok]
            lines.append(
                f"| {name} | {len(rows)} | "
                + (f"{med[0]:.3g} → {med[-1]:.3g}" if med else "–")
                + f" | {_fmt(low, '.3g')} | "
                + (f"{cos[0]:.2f} → {cos[-1]:.2f}" if cos else "–")
                + f" | {_fmt(next((r['step'] for r in rows if not r['finite']), None), 'd')} | "
                + (
                    f"{ok[0]['loss']:.3g} → {ok[-1]['loss']:.3g} (step {ok[-1]['step']})"
                    if ok
                    else "–"
                )  # fmt: skip
                + " |"
            )
        lines += ["", f"![CSN calibration]({images}/csn_calibration.png)", ""]
    return "\n".join(lines)


def update_doc(text: str, doc: Path = DOC) -> None:
    """Replaces the text between the suite markers of ``doc`` (appends them if absent)."""
    content = doc.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content and END in content:
        head, rest = content.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        content = head + block + tail
    else:
        content = content.rstrip("\n") + "\n\n## Suite results\n\n" + block + "\n"
    doc.write_text(content)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a few minutes; coarse numbers")
    group.add_argument("--full", action="store_true", help="longer runs, more seeds/sizes")
    group.add_argument("--smoke", action="store_true", help="tiny, for the tests (< 1 min)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help="cost,accuracy,training (or arena)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "suite.json")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/ untouched")
    parser.add_argument("--from-json", action="store_true", help="only redraw plots and docs")
    parser.add_argument(
        "--workloads", help="arena only: these workloads (comma-separated), added to --output"
    )
    parser.add_argument(
        "--resume", action="store_true", help="arena only: run the workloads --output lacks"
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "smoke" if args.smoke else "default"
    if args.only == "arena":
        from benchmarks import arena

        arena_mode = "default" if mode == "full" else mode
        output = None if args.output == RESULTS / "suite.json" else args.output
        workloads = [w for w in args.workloads.split(",") if w] if args.workloads else None
        return arena.main(
            arena_mode,
            output,
            docs=not args.no_docs,
            from_json=args.from_json,
            workloads=workloads,
            resume=args.resume,
        )
    if args.from_json:
        result = json.loads(args.output.read_text())
    else:
        sections = [s for s in args.only.split(",") if s]
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
        result = run(mode, sections)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"wrote {args.output}")
    files = plot(result, args.output.parent)
    print("plots: " + ", ".join(str(f) for f in files))
    if not args.no_docs:
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        for path in files:
            if path.stat().st_size < 300_000:
                shutil.copy(path, DOC_IMAGES / path.name)
        update_doc(markdown(result))
        print(f"updated {DOC}")
    return result


if __name__ == "__main__":
    main()
