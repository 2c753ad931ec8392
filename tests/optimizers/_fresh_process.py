"""Case scripts run in fresh Python processes, for what must precede TensorFlow's first op.

Logical CPU devices (two replicas on one CPU) can only be configured before TensorFlow
runs anything, which the shared pytest process has long done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def json_reports(script: str, argument_lists: Sequence[Sequence[str]], timeout: float) -> list[Any]:
    """Runs ``python script *arguments`` once per argument list, all side by side.

    Returns each run's last line of output parsed as JSON, in the order given; a run
    that fails fails the test with the end of its error output.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    runs = [
        subprocess.Popen(
            [sys.executable, script, *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for arguments in argument_lists
    ]
    reports = []
    for run in runs:
        out, err = run.communicate(timeout=timeout)
        assert run.returncode == 0, err[-4000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports
