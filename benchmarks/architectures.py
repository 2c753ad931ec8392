"""Cost on the architectures people train: MobileNetV2, a Transformer, an LSTM, a BN ResNet.

Run from the repository root::

    python -m benchmarks.architectures [--quick | --full] [--only hvp,steps,startup]
                                       [--threads N] [--no-docs]

Sections (each model at batch 32 on synthetic data; ratios, not absolute times, are the
figures: every ratio compares cases measured round-robin in one process, and the
fastest of ``repeats`` rounds is kept, so load from other processes hits them alike):

* ``hvp``: ``HessianOperator.matvec`` (training-mode forward) over one gradient of the
  same loss (median and fastest of interleaved calls);
* ``steps``: step time through ``model.fit`` (fastest interleaved epoch): ``AdaHessian``
  with ``update_each=1`` and ``5`` and ``Sophia`` (Hutchinson, ``update_every=1`` and
  ``5``) over ``Adam``; ``ClassSubspaceNewton`` (``"paper"``
  and ``"gauss_newton"``, statistics every step and every 10) over ``SGD``, at C = 10
  and C = 100, with the class-gradient path each model gets;
* ``startup``: one fresh process per (model, optimizer): the first step's latency
  (tracing included) over Adam's, how often the train step was traced by an epoch whose
  last batch is short, the peak host memory (``VmHWM``) above the built model and
  the optimizer's state; an optimizer that refuses a model is recorded with its error.

Writes ``benchmarks/results/architectures.json`` and the section between
``<!-- architectures:begin -->`` and ``<!-- architectures:end -->`` of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "architectures.json"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"
BATCH = 32
# An optimizer's refusal of a model (its own clear errors), recorded as a result row.
REFUSALS = (ValueError, TypeError, NotImplementedError, MemoryError)
TARGETS = {
    "hvp_over_grad": 2.2,
    "adahessian_over_adam": 2.0,
    "adahessian_5_over_adam": 1.2,
    "sophia_h_over_adam": 2.0,
    "sophia_h_5_over_adam": 1.2,
    "csn_paper_over_sgd": 3.0,
    "csn_gn_over_sgd": 4.0,
    "csn_gn_10_over_sgd": 1.5,
    "first_step_over_adam": 2.0,
}


@dataclass(frozen=True)
class Architecture:
    """A model family of the benchmark: builder, inputs and whether it outputs logits."""

    description: str
    inputs: str  # "images32", "images16" or "tokens:<length>:<vocabulary>"
    logits: bool = True

    def build(self, name: str, num_classes: int):
        from keras_curv import models

        builders = {
            "mobilenet_v2": lambda: models.mobilenet_v2((32, 32, 3), num_classes),
            "transformer": lambda: models.transformer_classifier(
                32, 700, num_classes, dim=64, heads=4
            ),
            "lstm": lambda: models.lstm_classifier(32, 1000, num_classes, units=64),
            "bn_resnet": lambda: models.batchnorm_resnet((16, 16, 3), num_classes),
        }
        return builders[name]()


ARCHITECTURES = {
    "mobilenet_v2": Architecture(
        "keras.applications.MobileNetV2, alpha 0.35, 32x32x3, softmax", "images32", False
    ),
    "transformer": Architecture(
        "Transformer encoder block (MHA + LayerNorm + Dropout), 32 tokens, dim 64",
        "tokens:32:700",
    ),
    "lstm": Architecture("Embedding-LSTM(64)-Dense, 32 tokens", "tokens:32:1000"),
    "bn_resnet": Architecture("BatchNorm ResNet (two residual blocks), 16x16x3", "images16"),
}

# mode -> settings. "smoke" is the tests' tiny configuration.
MODES = {
    "smoke": dict(models=("bn_resnet",), classes=(10,), steps=2, repeats=1, hvp_repeats=2,
                  csn_models=("bn_resnet",), startup_models=(), startup_optimizers=()),
    "quick": dict(models=("transformer", "lstm", "bn_resnet"), classes=(10,), steps=4,
                  hvp_models=("mobilenet_v2", "transformer", "lstm", "bn_resnet"),
                  repeats=3, hvp_repeats=6, csn_models=("bn_resnet", "lstm"),
                  startup_models=("bn_resnet",), startup_optimizers=("adam", "adahessian")),
    "default": dict(models=("mobilenet_v2", "transformer", "lstm", "bn_resnet"),
                    classes=(10, 100), steps=6, repeats=3, hvp_repeats=10,
                    csn_models=("transformer", "lstm", "bn_resnet"),
                    startup_models=("mobilenet_v2", "transformer", "lstm", "bn_resnet"),
                    startup_optimizers=("adam", "adahessian", "sophia_h", "csn_gn", "kfac",
                                        "shampoo")),
    "full": dict(models=("mobilenet_v2", "transformer", "lstm", "bn_resnet"),
                 classes=(10, 100), steps=10, repeats=5, hvp_repeats=20,
                 csn_models=("mobilenet_v2", "transformer", "lstm", "bn_resnet"),
                 startup_models=("mobilenet_v2", "transformer", "lstm", "bn_resnet"),
                 startup_optimizers=("adam", "sgd", "adahessian", "sophia_h", "csn_paper",
                                     "csn_gn", "kfac", "shampoo")),
}  # fmt: skip


def configure_threads(threads: int | None) -> None:
    """Pins TensorFlow's intra- and inter-op thread pools (before any op runs)."""
    if not threads:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def make_data(name: str, n: int, num_classes: int, seed: int = 0):
    """Synthetic inputs of ``name``'s kind and balanced, shuffled labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    kind = ARCHITECTURES[name].inputs
    if kind == "images32":
        x = rng.random((n, 32, 32, 3), dtype=np.float32)
    elif kind == "images16":
        x = rng.random((n, 16, 16, 3), dtype=np.float32)
    else:
        _, length, vocabulary = kind.split(":")
        x = rng.integers(0, int(vocabulary), (n, int(length))).astype(np.int32)
    y = (np.arange(n) % num_classes).astype(np.int32)
    rng.shuffle(y)
    return x, y


def make_loss(name: str):
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=ARCHITECTURES[name].logits)


def make_optimizer(key: str):
    """The optimizers compared, by key (small learning rates: timing, not training)."""
    import keras

    from keras_curv.optimizers import KFAC, AdaHessian, ClassSubspaceNewton, Shampoo, Sophia

    makers = {
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "sgd": lambda: keras.optimizers.SGD(1e-2),
        "adahessian": lambda: AdaHessian(1e-3),
        "adahessian_5": lambda: AdaHessian(1e-3, update_each=5),
        "sophia_h": lambda: Sophia(1e-3, update_every=1),
        "sophia_h_5": lambda: Sophia(1e-3, update_every=5),
        "kfac": lambda: KFAC(1e-3),
        "shampoo": lambda: Shampoo(1e-3),
        "csn_paper": lambda: ClassSubspaceNewton(1e-2),
        "csn_paper_10": lambda: ClassSubspaceNewton(1e-2, update_each=10),
        "csn_gn": lambda: ClassSubspaceNewton(1e-2, curvature="gauss_newton", damping=1.0),
        "csn_gn_10": lambda: ClassSubspaceNewton(
            1e-2, curvature="gauss_newton", damping=1.0, update_each=10
        ),
    }
    return makers[key]()


def compiled(name: str, key: str, num_classes: int, x, y, *, warm: bool = True):
    """A fresh model of ``name`` compiled with optimizer ``key``, after one untimed epoch."""
    import keras

    keras.utils.set_random_seed(0)
    model = ARCHITECTURES[name].build(name, num_classes)
    model.compile(optimizer=make_optimizer(key), loss=make_loss(name))
    if warm:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model


def class_gradient_path(model) -> str:
    """The path ``ClassSubspaceNewton`` takes for ``model``'s class gradients."""
    from keras_curv.optimizers import class_statistics

    return class_statistics.class_gradient_path_of(model)


# ------------------------------------------------------------------ sections


def measure_hvp(name: str, repeats: int, log=print) -> dict:
    """``HessianOperator.matvec`` over one gradient of the same training-mode loss."""
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.hvp_cost import interleaved_timings
    from keras_curv._internal.model import stateless_outputs
    from keras_curv.curvature import HessianOperator

    x, y = make_data(name, BATCH, 10)
    keras.utils.set_random_seed(0)
    model = ARCHITECTURES[name].build(name, 10)
    loss = make_loss(name)
    op = HessianOperator(model, loss, x, y, training=True, batch_size=BATCH)
    params = [v.value for v in model.trainable_variables]
    xt, yt = tf.constant(x), tf.constant(y)

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(params)
            value = loss(yt, stateless_outputs(model, params, xt, True))
        return tape.gradient(value, params)

    v = tf.constant(np.random.default_rng(1).standard_normal(op.dim), op.dtype)
    cases = {
        "grad": lambda: [tf.convert_to_tensor(g).numpy() for g in gradient()],
        "hvp": lambda: op.matvec(v).numpy(),
    }
    samples = interleaved_timings(cases, repeats, warmup=2, seed=0)
    row = {
        "model": name,
        "num_params": op.dim,
        "grad_median_s": statistics.median(samples["grad"]),
        "hvp_median_s": statistics.median(samples["hvp"]),
        "hvp_over_grad": min(samples["hvp"]) / min(samples["grad"]),
        "hvp_over_grad_median": statistics.median(samples["hvp"])
        / statistics.median(samples["grad"]),
    }
    log(f"  hvp {name} ({op.dim} params): {row['hvp_over_grad']:.2f}x a gradient")
    return row


def measure_steps(name: str, num_classes: int, keys, steps: int, repeats: int, log=print):
    """Fastest interleaved epoch per optimizer, in seconds per step."""
    from benchmarks.optimizer_cost import step_times

    x, y = make_data(name, BATCH * steps, num_classes)
    models = {key: compiled(name, key, num_classes, x, y) for key in keys}
    seconds = step_times(models, x, y, batch_size=BATCH, repeats=repeats)
    row = {"model": name, "num_classes": num_classes, "seconds_per_step": seconds}
    any_model = next(iter(models.values()))
    row["num_params"] = int(sum(int(v.shape.num_elements()) for v in any_model.trainable_weights))
    row["class_gradient_path"] = class_gradient_path(any_model)
    for key, value in seconds.items():
        reference = "adam" if key.startswith(("adahessian", "sophia")) else "sgd"
        if seconds.get(reference) and key not in ("adam", "sgd"):
            row[f"{key}_over_{reference}"] = value / seconds[reference]
    ratios = {k: round(v, 2) for k, v in row.items() if "_over_" in k}
    log(f"  steps {name} C={num_classes} ({row['class_gradient_path']}): {ratios}")
    return row


def child_startup(name: str, key: str) -> dict:
    """In a fresh process: first-step latency, traces over a short last batch, peak memory.

    The data are one ``tf.data`` pipeline, ``.batch(32)`` over ``2 * 32 + 5`` samples:
    the first step is ``fit`` on its first batch, then two epochs of the whole (whose
    last batch is short) count the train step's further traces. Its batch dimension is
    ``None`` from the start, as for arrays that do not divide into whole batches; arrays
    that do give Keras a static batch size, and a later ``fit`` on a different size
    traces once more (a new input signature, for every optimizer alike).
    """
    import keras
    import tensorflow as tf

    from keras_curv._internal import memory

    n = 2 * BATCH + 5  # a short last batch
    x, y = make_data(name, n, 10)
    keras.utils.set_random_seed(0)
    model = ARCHITECTURES[name].build(name, 10)
    model(x[:2])
    rss_built = _current_rss_bytes()
    optimizer = make_optimizer(key)
    traces = []
    train_step = model.train_step

    def counted(data):  # runs once per trace of the train function
        traces.append(1)
        return train_step(data)

    model.train_step = counted
    model.compile(optimizer=optimizer, loss=make_loss(name))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    start = time.perf_counter()
    try:
        model.fit(data.take(1), epochs=1, verbose=0)
    except REFUSALS as error:
        return {"model": name, "optimizer": key, "refused": f"{type(error).__name__}: {error}"}
    first = time.perf_counter() - start
    traces_first = len(traces)
    model.fit(data, epochs=2, verbose=0)
    peak = _peak_rss_bytes()
    state = memory.state_bytes(1, optimizer.variables)
    return {
        "model": name,
        "optimizer": key,
        "first_step_s": first,
        "retraces_over_short_batch": len(traces) - traces_first,
        "first_step_traces": traces_first,
        "train_step_traces": len(traces),
        "peak_rss_above_model_mb": (peak - rss_built) / 2**20,
        "optimizer_state_mb": state / 2**20,
    }


def _peak_rss_bytes() -> int:
    """This process's peak resident memory since its ``exec``.

    ``/proc/self/status``'s ``VmHWM`` belongs to the process's own address space;
    ``getrusage``'s ``ru_maxrss`` survives ``exec`` and would report the parent
    benchmark's peak (3.7 GB for every case of a default run).
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_startup(names, keys, threads: int | None, log=print) -> list[dict]:
    """Runs :func:`child_startup` for every (model, optimizer) in a fresh process each."""
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in names:
        for key in keys:
            command = [sys.executable, "-m", "benchmarks.architectures", "--child", f"{name}:{key}"]
            if threads:
                command += ["--threads", str(threads)]
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"startup child {name}:{key} failed:\n{done.stderr[-3000:]}")
            row = json.loads(lines[-1])
            rows.append(row)
            if "refused" in row:
                log(f"  startup {name} {key}: refused ({row['refused'][:120]})")
                continue
            log(
                f"  startup {name} {key}: first step {row['first_step_s']:.1f} s, "
                f"retraces {row['retraces_over_short_batch']}, peak "
                f"+{row['peak_rss_above_model_mb']:.0f} MB"
            )
    adam = {r["model"]: r["first_step_s"] for r in rows if r["optimizer"] == "adam"}
    for row in rows:
        if row["model"] in adam and "refused" not in row:
            row["first_step_over_adam"] = row["first_step_s"] / adam[row["model"]]
    return rows


def run(
    mode: str = "default",
    sections=("hvp", "steps", "startup"),
    threads=None,
    log=print,
    checkpoint=lambda result: None,
):
    """Measures the chosen sections with the settings of ``mode``; returns the results dict.

    ``checkpoint(result)`` is called after each section, so a failure keeps what was measured.
    """
    from benchmarks.hvp_cost import machine_info

    config = MODES[mode]
    result = {"mode": mode, "config": config, "machine": machine_info(), "threads": threads}
    result["onednn"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    result["load_average_start"] = list(os.getloadavg())
    started = time.perf_counter()
    if "hvp" in sections:
        log("[hvp]")
        names = config.get("hvp_models", config["models"])
        result["hvp"] = [measure_hvp(n, config["hvp_repeats"], log) for n in names]
        checkpoint(result)
    if "steps" in sections:
        log("[steps]")
        rows = []
        for name in config["models"]:
            for c in config["classes"]:
                keys = ["sgd"]
                if c == 10:
                    keys = ["adam", "adahessian", "adahessian_5", "sophia_h", "sophia_h_5", "sgd"]
                if name in config["csn_models"]:
                    keys += ["csn_paper", "csn_paper_10", "csn_gn", "csn_gn_10"]
                if keys == ["sgd"]:
                    continue
                rows.append(measure_steps(name, c, keys, config["steps"], config["repeats"], log))
        result["steps"] = rows
        checkpoint(result)
    if "startup" in sections and config["startup_models"]:
        log("[startup]")
        result["startup"] = measure_startup(
            config["startup_models"], config["startup_optimizers"], threads, log
        )
    result["seconds"] = time.perf_counter() - started
    result["load_average_end"] = list(os.getloadavg())
    return result


# ------------------------------------------------------------------ docs


def _fmt(value, spec=".2f"):
    return "–" if value is None else format(value, spec)


def _mark(value, target):
    if value is None:
        return "–"
    return f"{value:.2f}" + ("" if value <= target else " ✗")


def markdown(result: dict) -> str:
    """The generated section of ``docs/benchmarks.md``."""
    m = result["machine"]
    device = ", ".join(m["gpus"]) or f"{m['cpu_count']}-core CPU, no GPU"
    threads = result.get("threads")
    lines = [
        "_Generated by `python -m benchmarks.architectures"
        + ("" if result["mode"] == "default" else f" --{result['mode']}")
        + (f" --threads {threads}" if threads else "")
        + "`; do not edit by hand between the markers._",
        "",
        f"**Machine:** {device}, TensorFlow {m['tensorflow']}, Keras {m['keras']}; "
        + ("oneDNN off" if result.get("onednn") == "0" else "oneDNN on")
        + (f", {threads} TensorFlow thread(s) per pool" if threads else "")
        + "; load average "
        f"{result['load_average_start'][0]:.1f} at the start and "
        f"{result['load_average_end'][0]:.1f} at the end. "
        f"Took {result['seconds'] / 60:.0f} min. A ✗ marks a ratio above its target.",
        "",
    ]
    if result.get("hvp"):
        lines += [
            "| model | params | gradient ms (median) | HVP / gradient "
            f"(target ≤ {TARGETS['hvp_over_grad']}) | median ratio |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in result["hvp"]:
            lines.append(
                f"| {r['model']} | {r['num_params']:,} | {1e3 * r['grad_median_s']:.1f} | "
                f"{_mark(r['hvp_over_grad'], TARGETS['hvp_over_grad'])} | "
                f"{r['hvp_over_grad_median']:.2f} |"
            )
        lines.append("")
    if result.get("steps"):
        lines += [
            "| model | C | class gradients | Adam ms/step | AdaHessian / Adam (≤ 2.0) "
            "| `update_each=5` (≤ 1.2) | Sophia-H / Adam (≤ 2.0) | `update_every=5` (≤ 1.2) "
            "| SGD ms/step | CSN paper / SGD (≤ 3) "
            "| paper, every 10 | CSN GN / SGD (≤ 4) | GN, every 10 (≤ 1.5) |",
            "| --- " * 13 + "|",
        ]
        for r in result["steps"]:
            s = r["seconds_per_step"]
            lines.append(
                f"| {r['model']} | {r['num_classes']} | {r['class_gradient_path']} | "
                f"{_fmt(s.get('adam') and 1e3 * s['adam'], '.0f')} | "
                f"{_mark(r.get('adahessian_over_adam'), TARGETS['adahessian_over_adam'])} | "
                f"{_mark(r.get('adahessian_5_over_adam'), TARGETS['adahessian_5_over_adam'])} | "
                f"{_mark(r.get('sophia_h_over_adam'), TARGETS['sophia_h_over_adam'])} | "
                f"{_mark(r.get('sophia_h_5_over_adam'), TARGETS['sophia_h_5_over_adam'])} | "
                f"{1e3 * s['sgd']:.0f} | "
                f"{_mark(r.get('csn_paper_over_sgd'), TARGETS['csn_paper_over_sgd'])} | "
                f"{_fmt(r.get('csn_paper_10_over_sgd'))} | "
                f"{_mark(r.get('csn_gn_over_sgd'), TARGETS['csn_gn_over_sgd'])} | "
                f"{_mark(r.get('csn_gn_10_over_sgd'), TARGETS['csn_gn_10_over_sgd'])} |"
            )
        lines.append("")
    if result.get("startup"):
        lines += [
            "| model | optimizer | first step s | first step / Adam's (≤ 2) "
            "| retraces over a short last batch | peak RSS above the model, MB "
            "| optimizer state, MB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["startup"]:
            if "refused" in r:
                reason = r["refused"].split(". ")[0].replace("|", "/")
                lines.append(f"| {r['model']} | {r['optimizer']} | refused: {reason} | | | | |")
                continue
            lines.append(
                f"| {r['model']} | {r['optimizer']} | {r['first_step_s']:.1f} | "
                f"{_mark(r.get('first_step_over_adam'), TARGETS['first_step_over_adam'])} | "
                f"{r['retraces_over_short_batch']} | {r['peak_rss_above_model_mb']:.0f} | "
                f"{r['optimizer_state_mb']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def update_doc(text: str, doc: Path = DOC) -> None:
    """Replaces the text between this section's markers (appends them if absent)."""
    content = doc.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content and END in content:
        head, rest = content.split(BEGIN, 1)
        content = head + block + rest.split(END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(content)


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a few minutes; coarse numbers")
    group.add_argument("--full", action="store_true", help="every model at C = 100 too")
    group.add_argument("--smoke", action="store_true", help="tiny, for the tests")
    parser.add_argument("--only", default="hvp,steps,startup")
    parser.add_argument("--threads", type=int, default=None, help="TensorFlow threads per pool")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--from-json", action="store_true", help="only regenerate the docs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    if args.child:
        name, key = args.child.split(":")
        print(json.dumps(child_startup(name, key)), flush=True)
        return None
    mode = "quick" if args.quick else "full" if args.full else "smoke" if args.smoke else "default"
    if args.from_json:
        result = json.loads(args.output.read_text())
    else:
        sections = [s for s in args.only.split(",") if s]
        args.output.parent.mkdir(parents=True, exist_ok=True)

        def save(result):
            args.output.write_text(json.dumps(result, indent=1, default=float) + "\n")

        result = run(mode, sections, args.threads, checkpoint=save)
        save(result)
        print(f"wrote {args.output}")
    if not args.no_docs:
        update_doc(markdown(result))
        print(f"updated {DOC}")
    return result


if __name__ == "__main__":
    main()
