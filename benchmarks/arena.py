"""The optimizer arena: ``python -m benchmarks --only arena [--quick | --smoke]``.

Every contestant (:mod:`benchmarks.arena_optimizers`) on every workload it applies to
(:mod:`benchmarks.arena_workloads`), by the DeepOBS protocol:

1. **Tune.** For each learning rate of a log-spaced grid (5 points, a decade each way of
   the optimizer's default), train seed 0 for the workload's step budget and score the
   validation split at the end. The best finite score picks the rate.
2. **Rerun.** The chosen rate with seeds 1 and 2 besides seed 0 (3 seeds).
3. **Report**, as mean ± std over the seeds: steps and seconds to the target score
   (wall time of ``fit`` from the first call, tracing included, evaluation excluded;
   resolution one epoch), the final test metric, the step cost (median epoch time after
   the first, per step) and the optimizer state's size. Runs whose training loss turns
   non-finite or ends above twice its start are counted as diverged, never dropped.

Writes ``benchmarks/results/arena.json``, ``benchmarks/results/arena_<workload>.png`` and
the measured part of ``docs/arena.md`` (between ``<!-- arena:begin -->`` and
``<!-- arena:end -->``; the hand-written reading around it stays).
"""

from __future__ import annotations

import fcntl
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from benchmarks.arena_optimizers import GRID_EXPONENTS, Contestant, contestants
from benchmarks.arena_pinn import relative_error
from benchmarks.arena_workloads import WORKLOADS, Workload

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "arena.md"
DOC_IMAGES = ROOT / "docs" / "images" / "arena"
BEGIN, END = "<!-- arena:begin -->", "<!-- arena:end -->"

MODES = {
    # the test's configuration: seconds
    "smoke": dict(workloads=("digits_cnn",), contestants=("sgd", "adahessian"),
                  exponents=(0.0,), seeds=(0,), epoch_scale=0.125, max_train=256),
    # a few minutes: every contestant, two workloads, three rates, one seed
    "quick": dict(workloads=("digits_cnn", "logreg_ill_conditioned"), contestants=None,
                  exponents=(-0.5, 0.0, 0.5), seeds=(0,), epoch_scale=0.5, max_train=None),
    # the documented run: about an hour on 2 CPU cores
    "default": dict(workloads=None, contestants=None, exponents=GRID_EXPONENTS,
                    seeds=(0, 1, 2), epoch_scale=1.0, max_train=None),
}  # fmt: skip


def applies(contestant: Contestant, workload: Workload) -> bool:
    """Whether a contestant runs on a workload."""
    if contestant.needs_classes and not workload.classification:
        return False
    return workload.full_batch or not contestant.full_batch


def _score(model: keras.Model, workload: Workload, x, y) -> float:
    if workload.score == "relative_error":
        return relative_error(model, x, y)
    values = model.evaluate(x, y, batch_size=1024, verbose=0, return_dict=True)
    return float(values["accuracy" if workload.score == "accuracy" else "loss"])


def validation_score(model: keras.Model, workload: Workload, data) -> float:
    """The score that selects the rate; the training objective's gap for optimisation problems."""
    if workload.score == "suboptimality":
        return _score(model, workload, data.x_train, data.y_train) - workload.optimum()
    return _score(model, workload, data.x_val, data.y_val)


def _state_bytes(optimizer: keras.optimizers.Optimizer) -> int:
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in optimizer.variables))


def train_run(
    workload: Workload,
    contestant: Contestant,
    learning_rate: float | None,
    seed: int,
    *,
    epoch_scale: float = 1.0,
    max_train: int | None = None,
) -> dict:
    """One training run; returns its curves and summary numbers.

    The model is scored on the validation split after every epoch (outside the timed
    ``fit`` calls); the step counter is the optimizer's ``iterations``.
    """
    # Hundreds of runs in one process: drop the previous runs' graphs so that none pays
    # for them.
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    data = workload.data()
    x, y = data.x_train[:max_train], data.y_train[:max_train]
    full_batch = contestant.full_batch
    batch = len(x) if full_batch else workload.batch_size
    budget = workload.full_batch_steps if full_batch else workload.epochs
    epochs = max(1, round(budget * epoch_scale))
    model = workload.build(seed)
    metrics = ["accuracy"] if workload.score == "accuracy" else []
    run = {"learning_rate": learning_rate, "seed": seed, "refused": None, "steps": [],
           "seconds": [], "epoch_seconds": [], "train_loss": [], "val_score": []}  # fmt: skip
    elapsed = 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        try:
            if epoch == 0:
                optimizer = contestant.build(learning_rate, seed)
                model.compile(optimizer=optimizer, loss=workload.loss(), metrics=metrics)
                at_start = model.evaluate(x, y, batch_size=1024, verbose=0, return_dict=True)
                run["initial_loss"] = float(at_start["loss"])
                start = time.perf_counter()
            history = model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
        except (ValueError, TypeError, NotImplementedError) as error:
            if epoch:
                raise
            # The optimizer refuses this workload (its loss, its model) with a clear error.
            run["refused"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            return run
        spent = time.perf_counter() - start
        elapsed += spent
        loss = float(history.history["loss"][-1])
        run["epoch_seconds"].append(spent)
        run["seconds"].append(elapsed)
        run["steps"].append(int(optimizer.iterations.numpy()))
        run["train_loss"].append(loss)
        if not math.isfinite(loss):
            run["val_score"].append(float("nan"))
            break
        run["val_score"].append(validation_score(model, workload, data))
    last = run["train_loss"][-1]
    run["diverged"] = not math.isfinite(last) or last > 2.0 * run["initial_loss"]
    run["final_val"] = run["val_score"][-1]
    run["final_test"] = (
        float("nan") if run["diverged"] else _score(model, workload, data.x_test, data.y_test)
    )
    hit = next((i for i, v in enumerate(run["val_score"]) if workload.reached(v)), None)
    run["steps_to_target"] = None if hit is None else run["steps"][hit]
    run["seconds_to_target"] = None if hit is None else run["seconds"][hit]
    steps_per_epoch = run["steps"][0] or 1
    later = run["epoch_seconds"][1:] or run["epoch_seconds"]
    run["step_seconds"] = statistics.median(later) / steps_per_epoch
    run["first_epoch_seconds"] = run["epoch_seconds"][0]
    run["state_bytes"] = _state_bytes(optimizer)
    return run


def _better(workload: Workload, a: float, b: float | None) -> bool:
    if b is None or not math.isfinite(b):
        return math.isfinite(a)
    return a > b if workload.higher_is_better else a < b


def select(workload: Workload, grid_runs: list[dict]) -> dict | None:
    """The run with the best final validation score among those that did not diverge."""
    best = None
    for run in grid_runs:
        if run["diverged"] or not math.isfinite(run["final_val"]):
            continue
        if best is None or _better(workload, run["final_val"], best["final_val"]):
            best = run
    return best


def _mean_std(values: list) -> list[float] | None:
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return [statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0]


def summarize(runs: list[dict]) -> dict:
    """Mean ± std over seeds; how many reached the target and how many diverged."""
    return {
        "seeds": len(runs),
        "reached": sum(r["steps_to_target"] is not None for r in runs),
        "diverged": sum(r["diverged"] for r in runs),
        "steps_to_target": _mean_std([r["steps_to_target"] for r in runs]),
        "seconds_to_target": _mean_std([r["seconds_to_target"] for r in runs]),
        "final_test": _mean_std([r["final_test"] for r in runs]),
        "final_val": _mean_std([r["final_val"] for r in runs]),
        "step_ms": _mean_std([1e3 * r["step_seconds"] for r in runs]),
        "first_epoch_seconds": _mean_std([r["first_epoch_seconds"] for r in runs]),
        "state_bytes": runs[0]["state_bytes"],
    }


def run(
    mode: str = "default",
    log=print,
    *,
    workloads: Sequence[str] | None = None,
    on_workload: Callable[[str, dict], None] | None = None,
) -> dict:
    """Tunes, reruns and summarises every (workload, contestant) pair of ``mode``.

    Args:
        mode: A key of ``MODES``.
        log: Receives one line per training run.
        workloads: Runs only these of the mode's workloads (default: all of them).
        on_workload: Called with each workload's name and entry as soon as it is done.

    Returns:
        The result: mode, configuration, machine, one entry per workload, total seconds.
    """
    from benchmarks.hvp_cost import machine_info

    config = MODES[mode]
    pool = contestants()
    names = config["contestants"] or tuple(pool)
    chosen = config["workloads"] or tuple(WORKLOADS)
    if workloads is not None:
        unknown = sorted(set(workloads) - set(chosen))
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; mode {mode!r} has {list(chosen)}")
        chosen = [w for w in chosen if w in workloads]
    result = {"mode": mode, "config": dict(config),
              "machine": machine_info(), "workloads": {}}  # fmt: skip
    start = time.perf_counter()
    for wname in chosen:
        workload = WORKLOADS[wname]
        entry = {"description": workload.description, "score": workload.score,
                 "target": workload.target, "contestants": {}, "refused": {}}  # fmt: skip
        workload_start = time.perf_counter()
        for name in names:
            contestant = pool[name]
            if not applies(contestant, workload):
                continue
            kwargs = dict(epoch_scale=config["epoch_scale"], max_train=config["max_train"])
            grid = []
            for rate in contestant.grid(config["exponents"]):
                grid.append(train_run(workload, contestant, rate, config["seeds"][0], **kwargs))
                if grid[-1]["refused"]:
                    break
                log(f"  {wname:24s} {name:22s} lr={rate} val={grid[-1]['final_val']:.4g}"
                    f"{' diverged' if grid[-1]['diverged'] else ''}")  # fmt: skip
            if grid[-1]["refused"]:
                log(f"  {wname:24s} {name:22s} refused: {grid[-1]['refused']}")
                entry["refused"][name] = grid[-1]["refused"]
                continue
            best = select(workload, grid)
            reruns = [] if best is None else [best] + [
                train_run(workload, contestant, best["learning_rate"], seed, **kwargs)
                for seed in config["seeds"][1:]
            ]  # fmt: skip
            entry["contestants"][name] = {
                "description": contestant.description,
                "grid": [
                    {
                        "learning_rate": r["learning_rate"],
                        "final_val": r["final_val"],
                        "diverged": r["diverged"],
                    }
                    for r in grid
                ],  # fmt: skip
                "grid_diverged": sum(r["diverged"] for r in grid),
                "learning_rate": None if best is None else best["learning_rate"],
                "summary": summarize(reruns) if reruns else None,
                "runs": reruns,
            }
        entry["seconds"] = time.perf_counter() - workload_start
        result["workloads"][wname] = entry
        if on_workload is not None:
            on_workload(wname, entry)
    result["seconds"] = time.perf_counter() - start
    return result


def update_doc(text: str, doc: Path = DOC) -> None:
    """Replaces the text between the arena markers of ``doc``."""
    content = doc.read_text()
    if BEGIN not in content or END not in content:
        raise ValueError(f"{doc} lacks the {BEGIN} ... {END} markers")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def _record(output: Path, mode: str, config: dict, machine: dict, name: str,
            entry: dict) -> dict:  # fmt: skip
    """Adds one workload's entry to ``output`` under a lock; returns the file's result.

    Several processes may share one output (each running some of the workloads), and an
    interrupted run keeps the workloads it finished.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = _load(output, mode) or {"mode": mode, "config": config, "machine": machine,
                                         "workloads": {}}  # fmt: skip
        result["workloads"][name] = entry
        order = list(WORKLOADS)  # the documented order, whichever process finished first
        result["workloads"] = dict(sorted(result["workloads"].items(),
                                          key=lambda item: order.index(item[0])))  # fmt: skip
        result["seconds"] = sum(e.get("seconds", 0.0) for e in result["workloads"].values())
        output.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


def _load(output: Path, mode: str) -> dict | None:
    """The results in ``output`` if they come from a run of ``mode``."""
    if not output.exists():
        return None
    result = json.loads(output.read_text())
    return result if result.get("mode") == mode else None


def main(
    mode: str = "default",
    output: Path | None = None,
    docs: bool = True,
    from_json: bool = False,
    workloads: Sequence[str] | None = None,
    resume: bool = False,
) -> dict:
    """Runs the arena (or rereads ``output``), writes the JSON, the figures and the docs.

    Args:
        mode: A key of ``MODES``.
        output: The JSON (default ``benchmarks/results/arena.json``, or
            ``arena_<mode>.json`` outside the default mode). Each workload is written as
            soon as it is done.
        docs: Whether to update ``docs/arena.md`` and its figures.
        from_json: Only redraw the figures and the docs from ``output``.
        workloads: Runs only these workloads, adding them to ``output`` (other processes
            may run the others into the same file at the same time).
        resume: Keeps the workloads ``output`` already holds from a run of this mode and
            runs only the missing ones.

    Returns:
        The result as written to ``output``.
    """
    import shutil

    from benchmarks import arena_report

    output = output or RESULTS / ("arena.json" if mode == "default" else f"arena_{mode}.json")
    if from_json:
        result = json.loads(output.read_text())
    else:
        if not (workloads or resume) and output.exists():
            output.unlink()  # a fresh run replaces the old results
        done = (_load(output, mode) or {"workloads": {}})["workloads"] if resume else {}
        chosen = [w for w in (workloads or MODES[mode]["workloads"] or WORKLOADS)
                  if w not in done]  # fmt: skip
        from benchmarks.hvp_cost import machine_info

        machine = machine_info()
        result = _load(output, mode) or {"workloads": {}}

        def record(name: str, entry: dict) -> None:
            nonlocal result
            result = _record(output, mode, dict(MODES[mode]), machine, name, entry)

        if chosen:
            run(mode, workloads=chosen, on_workload=record)
        print(f"wrote {output}")
    files = arena_report.plot(result, output.parent)
    if docs:
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy(path, DOC_IMAGES / path.name)
        update_doc(arena_report.markdown(result))
        print(f"updated {DOC}")
    return result
