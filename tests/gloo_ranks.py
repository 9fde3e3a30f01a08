"""Run a test module's rank function as gloo ranks forked from a fresh interpreter.

Forking the pytest process itself is unsafe: earlier tests leave threads behind (Ray, MLflow,
torch's pools), and a child forked while one of them holds a lock waits on it forever. The
ranks then never finish, and multiprocessing joins the non-daemon children at interpreter exit,
so the whole test run hangs (seen on CI). Here a fresh ``python`` that has started no thread
imports the test module by path and forks the ranks (cheap: the children inherit the imports,
where ``spawn`` would re-import torch and MONAI per rank); the fresh process runs in its own
session and is killed as a group when it overruns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

#: How long one rank waits for the others in ``init_process_group`` and in a collective.
GLOO_TIMEOUT = timedelta(seconds=120)

_LAUNCHER = """
import importlib.util, json, sys
import torch.multiprocessing as mp
path, function, nprocs, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
spec = importlib.util.spec_from_file_location("_gloo_rank_module", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
mp.start_processes(
    getattr(module, function), args=tuple(args), nprocs=nprocs, join=True, start_method="fork"
)
"""


def run_gloo_ranks(
    module_file: str, function: str, args: list, *, nprocs: int = 2, timeout: float = 240.0
) -> None:
    """Call ``function(rank, *args)`` of the module at ``module_file`` in ``nprocs`` processes.

    ``args`` must be JSON (ports, paths, numbers). Fails the test with the ranks' output when a
    rank raises or when they overrun ``timeout`` seconds (then the whole group is SIGKILLed).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", _LAUNCHER, module_file, function, str(nprocs)]
    process = subprocess.Popen(
        [*command, json.dumps(args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{nprocs} ranks overran {timeout:.0f} s:\n{_tail(output)}")
    if process.returncode != 0:
        pytest.fail(f"the ranks failed (exit {process.returncode}):\n{_tail(output)}")


def _tail(output: bytes) -> str:
    return output.decode(errors="replace")[-4000:]


__all__ = ["GLOO_TIMEOUT", "run_gloo_ranks"]
