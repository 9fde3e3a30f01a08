"""Training progress: rank 0 sends it to the launcher, the launcher shows it.

Ray's and MLflow's own output stays out of the terminal by default (``log_to_driver=False``), so
the worker's prints no longer reach the user. Instead rank 0 sends a small record every
``log_interval`` steps to a :class:`ProgressInbox` actor that the launcher owns; a launcher thread
drains it and shows one line per run (a ``rich`` bar on a terminal, plain lines otherwise, e.g.
under ``ray job submit`` or in tests).

The inbox also tells the workers whether the launcher still lives: Ray destroys an actor when its
owner (the launcher's process) dies, so :meth:`ProgressSender.launcher_alive` fails from then on
and the loop stops its workers instead of training on alone (issue 13, case 8).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RaySystemError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

PREFIX = "[noisyseg train]"
#: Seconds a liveness check may wait for the inbox (the launcher's node may be loaded).
PING_TIMEOUT_S = 30.0


@dataclass
class ProgressRecord:
    """One progress update of a run. ``kind``: ``step`` (loss, rate), ``note`` (``text``)."""

    run_name: str
    kind: str
    step: int
    total: int
    loss: float = float("nan")
    lr: float = float("nan")
    steps_per_s: float = 0.0
    text: str = ""

    def line(self) -> str:
        """The plain-text form (one line)."""
        if self.kind != "step":
            return f"{PREFIX} {self.text}"
        width = len(str(self.total))
        return (
            f"{PREFIX} step {self.step:>{width}}/{self.total}  loss {self.loss:.4f}  "
            f"lr {self.lr:.3e}  {self.steps_per_s:.2f} steps/s  ETA {self.eta()}  "
            f"[{self.run_name}]"
        )

    def eta(self) -> str:
        """Time left at the current rate, ``h:mm:ss`` (``?`` before a rate is known)."""
        if self.steps_per_s <= 0:
            return "?"
        seconds = int(round((self.total - self.step) / self.steps_per_s))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@ray.remote(num_cpus=0)
class ProgressInbox:
    """Holds records until the launcher drains them (0 CPUs: never competes with training)."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def drain(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items

    def ping(self) -> bool:
        return True


class ProgressSender:
    """Rank 0's end: send records, check that the launcher lives. ``inbox=None``: print lines
    locally instead (plain process) or nothing (``echo=False``)."""

    def __init__(self, inbox: Any | None, *, echo: bool = False) -> None:
        self._inbox = inbox
        self._echo = echo

    def send(self, record: ProgressRecord) -> None:
        if self._inbox is not None:
            self._inbox.put.remote(asdict(record))  # fire and forget
        elif self._echo:
            print(record.line(), flush=True)

    def launcher_alive(self) -> bool:
        """False once the launcher's process (the inbox's owner) is gone."""
        if self._inbox is None:
            return True
        try:
            return bool(ray.get(self._inbox.ping.remote(), timeout=PING_TIMEOUT_S))
        except (RayActorError, RaySystemError, GetTimeoutError):
            return False


_bars_lock = threading.Lock()
_bars: Progress | None = None  # rich allows one live display per process: all runs share it
_bars_users = 0


def _acquire_bars() -> Progress:
    global _bars, _bars_users
    with _bars_lock:
        if _bars is None:
            _bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[rate]} steps/s"),
                TextColumn("ETA {task.fields[eta]}"),
                console=Console(),
            )
            _bars.start()
        _bars_users += 1
        return _bars


def _release_bars() -> None:
    global _bars, _bars_users
    with _bars_lock:
        _bars_users -= 1
        if _bars_users == 0 and _bars is not None:
            _bars.stop()
            _bars = None


class ProgressDisplay:
    """One line per run on the terminal; plain lines when output is not a terminal.

    Thread-safe. On a terminal every display of the process draws into one shared ``rich``
    progress (rich allows one live display at a time), one bar per run name: the benchmark's
    parallel runs each get a line.
    """

    def __init__(self, print_fn: Callable[[str], None] = print, *, live: bool | None = None):
        self._print = print_fn
        self._live = sys.stdout.isatty() if live is None else live
        self._lock = threading.Lock()
        self._bars: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def show(self, record: ProgressRecord) -> None:
        with self._lock:
            if not self._live:
                self._print(record.line())
                return
            if self._bars is None:
                self._bars = _acquire_bars()
            if record.kind != "step":
                self._bars.console.print(record.line(), highlight=False)
            else:
                self._update_bar(self._bars, record)

    def _update_bar(self, bars: Progress, record: ProgressRecord) -> None:
        fields = {
            "loss": f"{record.loss:.4f}",
            "rate": f"{record.steps_per_s:.2f}",
            "eta": record.eta(),
        }
        task = self._tasks.get(record.run_name)
        if task is None:
            task = bars.add_task(record.run_name, total=record.total, **fields)
            self._tasks[record.run_name] = task
        bars.update(task, completed=record.step, total=record.total, **fields)

    def close(self) -> None:
        with self._lock:
            if self._bars is not None:
                for task in self._tasks.values():
                    self._bars.remove_task(task)
                self._tasks.clear()
                self._bars = None
                _release_bars()


class ProgressReceiver:
    """The launcher's end: owns the inbox, drains it every ``interval_s`` into a display."""

    def __init__(self, display: ProgressDisplay, *, interval_s: float = 0.5) -> None:
        self.inbox = ProgressInbox.remote()
        self._display = display
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="noisyseg-progress", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            items = ray.get(self.inbox.drain.remote(), timeout=PING_TIMEOUT_S)
        except (RayActorError, RaySystemError, GetTimeoutError):
            return
        for item in items:
            self._display.show(ProgressRecord(**item))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._drain()

    def close(self) -> None:
        """Show what is left, stop the thread, end the inbox."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        try:
            ray.kill(self.inbox)
        except Exception:  # noqa: BLE001 - Ray may already be shut down
            pass
