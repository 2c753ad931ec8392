"""Wall-clock overhead of the diagnostic callbacks on ``model.fit``.

Run from the repository root::

    python -m benchmarks.callback_overhead [--epochs 30] [--probe 256] [--repeats 2]
                                           [--schedule budget|every-epoch]

Trains ``keras_curv.models.small_cnn`` on the digits data (batch 32) for ``--epochs``
epochs, without callbacks and with ``HessianSpectrum`` + ``SubspaceAlignment`` on a probe
set of ``--probe`` held-out samples, all in one process. ``--schedule budget`` (default)
uses the callbacks' default schedule (``max_overhead=0.1``); ``every-epoch`` passes
``every_n_epochs=1``. Each configuration is repeated and the fastest run kept (the first
fit of a new model pays tracing, in both configurations). Besides the total, the time spent
inside each callback's measurement, the number of measurements and of Hessian-vector
products are recorded. Results go to stdout and
``benchmarks/results/callback_overhead_<schedule>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment  # noqa: E402
from keras_curv.data import load_dataset  # noqa: E402
from keras_curv.models import small_cnn  # noqa: E402

TARGET_OVERHEAD = 0.10
RESULTS = Path(__file__).resolve().parent / "results" / "callback_overhead.json"


class Timed:
    """Wraps a callback's ``_measure`` to accumulate the seconds spent in it."""

    def __init__(self, callback):
        self.durations: list[float] = []
        inner = callback._measure

        def measure(step):
            start = time.perf_counter()
            try:
                return inner(step)
            finally:
                self.durations.append(time.perf_counter() - start)

        callback._measure = measure

    @property
    def seconds(self) -> float:
        return sum(self.durations)

    @property
    def count(self) -> int:
        return len(self.durations)


def run(
    data,
    epochs: int,
    probe: int,
    with_callbacks: bool,
    seed: int,
    schedule: str,
    *,
    make_model=None,
    batch_size: int = 32,
) -> dict:
    """One ``fit`` of ``epochs`` epochs, with or without both diagnostic callbacks.

    Args:
        data: Anything with ``x_train``, ``y_train``, ``x_test``, ``y_test``,
            ``input_shape`` and ``num_classes`` (a ``DatasetSplits``).
        epochs: Training epochs.
        probe: Held-out samples the callbacks measure on.
        with_callbacks: Attach ``HessianSpectrum`` and ``SubspaceAlignment``.
        seed: Weight initialisation seed.
        schedule: ``"budget"`` (their default) or ``"every-epoch"``.
        make_model: ``make_model()`` builds the model; default ``small_cnn``.
        batch_size: Training batch size.

    Returns:
        ``seconds`` of the fit, ``final_loss``, and with callbacks the seconds, counts and
        per-call ``durations`` of each callback's measurements, and the products spent.
    """
    keras.utils.set_random_seed(seed)
    if make_model is None:
        model = small_cnn(data.input_shape, data.num_classes)
    else:
        model = make_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks, timers = [], {}
    if with_callbacks:
        probe_set = (data.x_test[:probe], data.y_test[:probe])
        kwargs = {"every_n_epochs": 1} if schedule == "every-epoch" else {}
        callbacks = [HessianSpectrum(probe_set, **kwargs), SubspaceAlignment(probe_set, **kwargs)]
        timers = {type(cb).__name__: Timed(cb) for cb in callbacks}
    start = time.perf_counter()
    history = model.fit(
        data.x_train,
        data.y_train,
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        callbacks=callbacks,
    )
    total = time.perf_counter() - start
    out = {"seconds": total, "final_loss": float(history.history["loss"][-1])}
    out.update({f"{name}_seconds": t.seconds for name, t in timers.items()})
    out.update({f"{name}_measurements": t.count for name, t in timers.items()})
    out.update({f"{name}_durations": t.durations for name, t in timers.items()})
    if callbacks:
        out["hessian_vector_products"] = callbacks[0].operator.num_matvecs
        out["shared_operator"] = callbacks[0].operator is callbacks[1].operator
        out["steps"] = callbacks[0].measurements.get("step", [])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--schedule", choices=("budget", "every-epoch"), default="budget")
    parser.add_argument("--probe", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    data = load_dataset("digits")
    runs = {"plain": [], "callbacks": []}
    for repeat in range(args.repeats):
        for name in runs:
            runs[name].append(
                run(data, args.epochs, args.probe, name == "callbacks", repeat, args.schedule)
            )
    plain = min(r["seconds"] for r in runs["plain"])
    best = min(runs["callbacks"], key=lambda r: r["seconds"])
    overhead = best["seconds"] / plain - 1.0
    result = {
        "epochs": args.epochs,
        "schedule": args.schedule,
        "probe": args.probe,
        "train_samples": int(data.x_train.shape[0]),
        "plain_seconds": plain,
        "callbacks_seconds": best["seconds"],
        "overhead": overhead,
        "target": TARGET_OVERHEAD,
        "per_callback_seconds": {k: v for k, v in best.items() if k.endswith("_seconds")},
        "measurements": {k: v for k, v in best.items() if k.endswith("_measurements")},
        "hessian_vector_products": best.get("hessian_vector_products"),
        "measured_at_epochs": best.get("steps"),
        "runs": runs,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
    }
    print(
        f"fit, {args.epochs} epochs, digits, small_cnn, schedule {args.schedule}: "
        f"plain {plain:.2f} s, "
        f"with both callbacks {best['seconds']:.2f} s, overhead {100 * overhead:.1f}% "
        f"(target <= {100 * TARGET_OVERHEAD:.0f}%)"
    )
    for key, value in result["per_callback_seconds"].items():
        print(f"  {key}: {value:.2f} s")
    print(f"  measurements: {result['measurements']} at epochs {result['measured_at_epochs']}")
    print(f"  Hessian-vector products: {result['hessian_vector_products']}")
    RESULTS.parent.mkdir(exist_ok=True)
    path = RESULTS.with_name(f"callback_overhead_{args.schedule.replace('-', '_')}.json")
    path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
