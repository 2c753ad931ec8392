"""Case scripts run in fresh Python processes, for what must precede TensorFlow's first op.

Logical CPU devices (two replicas on one CPU) can only be configured before TensorFlow
runs anything, which the shared pytest process has long done; a multi-worker strategy
needs one process per worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest


def json_reports(
    script: str,
    argument_lists: Sequence[Sequence[str]],
    timeout: float,
    envs: Sequence[Mapping[str, str]] | None = None,
) -> list[Any]:
    """Runs ``python script *arguments`` once per argument list, all side by side.

    Args:
        script: The case script.
        argument_lists: One list of arguments per run.
        timeout: Seconds for all runs together; past it every run is killed and the
            test fails (a run that waits forever on another, e.g. in a collective,
            fails instead of blocking).
        envs: Extra environment variables per run (e.g. each worker's ``TF_CONFIG``).

    Returns:
        Each run's last line of output parsed as JSON, in the order given; a run that
        fails fails the test with the end of its error output.
    """
    base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    envs = envs or [{}] * len(argument_lists)
    runs = [
        subprocess.Popen(
            [sys.executable, script, *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, **extra},
        )
        for arguments, extra in zip(argument_lists, envs)
    ]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for run in runs:
            outputs.append(run.communicate(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
        for run in runs:
            run.kill()
        ends = [err for _, err in outputs] + [run.communicate()[1] for run in runs[len(outputs) :]]
        pytest.fail(
            f"{script} did not finish in {timeout:.0f} s; ends of the error outputs:\n"
            + "\n".join(end[-1500:] for end in ends)
        )
    failed = [err[-6000:] for run, (_, err) in zip(runs, outputs) if run.returncode != 0]
    # Every failed run's error: one worker's crash shows as a collective error on others.
    assert not failed, "\n\n".join(failed)
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
