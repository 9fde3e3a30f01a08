"""The run guard: a small process that closes a training run's MLflow run when the launcher dies.

A launcher that ends normally, fails or is interrupted marks its MLflow run itself
(:func:`~noisyseg.distributed.trainer.fit`). One that is killed (``kill -9``, the OOM killer, a
lost node) cannot, and Ray then tears down the job's actors, Train workers included, usually
before rank 0 notices the launcher is gone (:class:`~noisyseg.distributed.progress.ProgressSender`).
The run would stay ``RUNNING`` for ever.

So the launcher starts this guard in a session of its own (Ctrl-C on the terminal does not reach
it) and holds the write end of its stdin. The guard blocks on reading it:

* the launcher writes :data:`DONE` and closes it when it has ended the run itself: the guard
  exits without touching MLflow;
* end of file without :data:`DONE` means the launcher died: the guard waits up to
  ``grace_s`` for the workers to end the run themselves, then marks it ``KILLED`` with the
  reason (the last logged step and the newest checkpoint a re-launch resumes from).

Nothing is found by process id or by scanning the process table: the pipe is the handle. The
guard imports MLflow and torch only once the launcher has died, so while the run lives it costs
one idle interpreter and no CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DONE = "done"
#: Seconds the guard leaves the workers to end the run themselves after the launcher died.
DEFAULT_GRACE_S = 10.0
STEP_METRIC = "train/loss"


@dataclass
class RunGuard:
    """The launcher's end of a guard process; :meth:`release` when the run is ended properly."""

    process: subprocess.Popen
    pipe: IO[str]

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        run_id: str,
        run_dir: str | Path | None,
        *,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> RunGuard:
        # The file itself, not ``-m``: the package's __init__ would import pydantic and torch.
        command = [sys.executable, __file__,
                   "--tracking-uri", tracking_uri, "--run-id", run_id,
                   "--grace-s", str(grace_s)]  # fmt: skip
        if run_dir is not None:
            command += ["--run-dir", str(run_dir)]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        assert process.stdin is not None
        return cls(process, process.stdin)

    def release(self) -> None:
        """The launcher ended the run itself: the guard exits without touching MLflow."""
        try:
            self.pipe.write(f"{DONE}\n")
            self.pipe.close()
        except OSError:  # the guard is already gone: nothing to tell it
            pass


def last_logged_step(tracking_uri: str, run_id: str) -> int | None:
    """The highest step of the run's ``train/loss`` history (``None``: nothing logged)."""
    from mlflow import MlflowClient  # see the module docstring: imported only when needed

    history = MlflowClient(tracking_uri).get_metric_history(run_id, STEP_METRIC)
    return max((m.step for m in history), default=None)


def lost_launcher_reason(tracking_uri: str, run_id: str, run_dir: str | None) -> str:
    """One line: where the workers stopped and which checkpoint a re-launch resumes from."""
    from noisyseg.distributed.checkpoints import latest_checkpoint_state

    step = last_logged_step(tracking_uri, run_id)
    latest = latest_checkpoint_state(run_dir) if run_dir is not None else None
    newest = int(latest[1]["step"]) if latest is not None else None
    stopped = f"stopped at step {step}" if step is not None else "stopped before step 1"
    resume = (
        f"; a re-launch resumes from checkpoint step {newest}"
        if newest is not None
        else "; no checkpoint was written"
    )
    return f"the launcher (noisyseg train) was killed; the workers {stopped}{resume}"


def guard(
    stdin: IO[str], tracking_uri: str, run_id: str, run_dir: str | None, grace_s: float
) -> str:
    """Block until the launcher releases or dies; returns what the guard did (for tests)."""
    if DONE in stdin.read().split():
        return "released"
    from noisyseg.distributed.tracking import finish_run, run_status  # the launcher died

    deadline = time.monotonic() + grace_s
    while True:  # one last look at the deadline, then the guard closes the run
        if run_status(tracking_uri, run_id) != "RUNNING":
            return "ended by the workers"
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    finish_run(
        tracking_uri, run_id, "KILLED", reason=lost_launcher_reason(tracking_uri, run_id, run_dir)
    )
    return "marked KILLED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--run-dir", default=None, help="a local directory or a URL (s3://...)")
    parser.add_argument("--grace-s", type=float, default=DEFAULT_GRACE_S)
    args = parser.parse_args(argv)
    guard(sys.stdin, args.tracking_uri, args.run_id, args.run_dir, args.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
