"""Regenerates the TensorBoard screenshots of docs/tensorboard.md from a real training run.

What it does:

1. trains ``small_cnn`` on the offline ``digits`` data with ``ClassSubspaceNewton`` and the
   two diagnostic callbacks measuring every epoch (``HessianSpectrum`` with per-layer
   blocks), plus ``keras.callbacks.TensorBoard``,
   all writing to one temporary ``log_dir`` (the same set-up as ``keras-curv demo``);
2. starts ``tensorboard --logdir <log_dir>`` on the loopback interface only;
3. photographs its dashboards with headless Chromium and writes downscaled PNGs to
   ``docs/images/``.

Only needed to refresh the pictures, never by the tests or the package. Needs Chromium
(``apt-get install chromium`` on Debian) and Pillow. Run from the repository root::

    PYTHONPATH=. python docs/screenshots/make_screenshots.py [--epochs 10] [--keep-logs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "docs" / "images"
# Each shot: output name, TensorBoard URL fragment, seconds of virtual time for the frontend.
# (The Time Series dashboard draws its line charts with WebGL, which headless Chromium with
# --disable-gpu leaves blank, so the legacy Scalars/Images/Histograms dashboards are shot.)
SHOTS = [
    ("tensorboard-custom-scalars.png", "#custom_scalars", 30000),
    ("tensorboard-scalars-hessian.png", "#scalars&tagFilter=hessian", 20000),
    ("tensorboard-scalars-blocks.png", "#scalars&tagFilter=blocks%7Ccurvature_model", 20000),
    ("tensorboard-scalars-alignment.png", "#scalars&tagFilter=alignment", 20000),
    ("tensorboard-scalars-optimizer.png", "#scalars&tagFilter=optimizer%2Finverse", 20000),
    ("tensorboard-images.png", "#images", 20000),
    ("tensorboard-histograms.png", "#histograms&tagFilter=hessian%7Calignment", 20000),
]
MAX_BYTES = 500_000


def train(log_dir: Path, epochs: int, seed: int) -> None:
    """Trains a small CNN with ClassSubspaceNewton and both callbacks every epoch."""
    import keras

    from keras_curv import ClassSubspaceNewton
    from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment
    from keras_curv.data import load_dataset
    from keras_curv.models import small_cnn

    keras.utils.set_random_seed(seed)
    data = load_dataset("digits", seed=seed)
    model = small_cnn(data.input_shape, data.num_classes)
    model.compile(
        # The settings that train this CNN (see docs/class_subspace_newton.md): the calibrated
        # curvature, the exact inverse (the class directions of a CNN are far from orthogonal)
        # and a unit damping.
        optimizer=ClassSubspaceNewton(
            learning_rate=0.1, curvature="gauss_newton", inverse="exact", damping=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    probe = (data.x_test[:256], data.y_test[:256])
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=64,
        epochs=epochs,
        validation_data=(data.x_test, data.y_test),
        callbacks=[
            keras.callbacks.TensorBoard(str(log_dir)),
            HessianSpectrum(
                probe, every_n_epochs=1, density=True, blocks="layer", log_dir=str(log_dir)
            ),
            SubspaceAlignment(probe, every_n_epochs=1, log_dir=str(log_dir)),
        ],
        verbose=2,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"TensorBoard did not answer at {url} within {seconds:.0f} s.")
        time.sleep(0.5)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("No Chromium found; install it (Debian: apt-get install -y chromium).")


def screenshot(url: str, out: Path, budget_ms: int, size: tuple[int, int]) -> None:
    """One headless Chromium screenshot; no network beyond the loopback TensorBoard."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def shrink(path: Path, width: int = 1200) -> None:
    """Downscales a PNG to ``width`` pixels and palettises it until it is under MAX_BYTES."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.save(path, optimize=True)
    colors = 256
    while path.stat().st_size > MAX_BYTES and colors >= 32:
        image.quantize(colors=colors).save(path, optimize=True)
        colors //= 2
    if path.stat().st_size > MAX_BYTES:
        raise RuntimeError(f"{path} is still {path.stat().st_size} bytes.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=None, help="reuse existing logs")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="names of shots to retake")
    args = parser.parse_args(argv)

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="keras-curv-logs-"))
    if args.log_dir is None:
        train(log_dir, args.epochs, args.seed)
    port = _free_port()
    board = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("tensorboard")),
            "--logdir",
            str(log_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}/"
        _wait_for(base + "data/runs", 120)
        # The first load of a log directory is lazy; give the backend time to read it.
        time.sleep(5)
        IMAGES.mkdir(parents=True, exist_ok=True)
        for name, fragment, budget in SHOTS:
            if args.only and name not in args.only:
                continue
            out = IMAGES / name
            # The custom-scalars page stacks its charts: a taller window shows them all.
            size = (1400, 2000) if "custom" in name else (1400, 1000)
            screenshot(base + fragment, out, budget, size)
            shrink(out)
            print(f"{out.relative_to(ROOT)}: {out.stat().st_size:,} bytes")
    finally:
        board.terminate()
        board.wait(timeout=30)
        if args.log_dir is None and not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif args.log_dir is None:
            print(f"logs kept in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
