"""Which runs are writing a stage directory now, so that one run never deletes another's temp files.

A run claims a stage directory by writing ``<stage_dir>/.claims/<token>.json`` (host, pid, start and
heartbeat times), refreshes the heartbeat from a background thread while it works, and removes the
claim when it ends. A claim is live while its heartbeat is younger than ``stale_after`` seconds; a
claim left by a process of this host that no longer exists is dead at once (a killed run that is
restarted straight away). Temp files (``.tmp-*``, see :mod:`facegen.storage`) are removed only by a
run that sees no other live claim, and only those listed before it looked, so a run that claims
the stage meanwhile cannot lose a file it is writing.

A claim also records its run's settings digest: a second run on a stage that a live run holds is
refused in one line when its settings differ, and waits for the first when they match (then it
finds the first run's blocks done and makes only the rest), so no block is made twice.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

from facegen import storage

CLAIMS_DIR = ".claims"
TEMP_PREFIX = ".tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_is_live(claim: dict[str, Any], now: float, stale_after: float) -> bool:
    """Whether a claim record still stands for a working run."""
    if claim.get("host") == socket.gethostname() and not _pid_alive(int(claim.get("pid", -1))):
        return False
    return now - float(claim.get("heartbeat", 0.0)) < stale_after


class StageClaim:
    """Context manager: this run works in ``stage_dir`` (see the module docstring)."""

    def __init__(self, stage_dir: str, heartbeat_s: float = 20.0, stale_after: float = 120.0, settings: str = ""):
        self.stage_dir = stage_dir.rstrip("/")
        self.settings = settings
        self.token = uuid.uuid4().hex[:16]
        self.heartbeat_s, self.stale_after = heartbeat_s, stale_after
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        """Where this run's claim record lives."""
        return f"{self.stage_dir}/{CLAIMS_DIR}/{self.token}.json"

    def _write(self) -> None:
        storage.write_json_atomic({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                                   "started": self.started, "heartbeat": time.time(), "settings": self.settings},
                                  self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except OSError:  # a missed heartbeat only makes the claim look older; the next one fixes it
                pass

    def __enter__(self) -> "StageClaim":
        self._write()
        self._thread = threading.Thread(target=self._beat, name=f"claim-{self.token}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        storage.remove(self.path)

    def other_live_claims(self) -> list[dict[str, Any]]:
        """The live claims of other runs on this stage directory (dead ones are removed on the way)."""
        now, live = time.time(), []
        for name in storage.list_sizes(f"{self.stage_dir}/{CLAIMS_DIR}"):
            if not name.endswith(".json") or name == f"{self.token}.json":
                continue
            try:
                claim = storage.read_json(f"{self.stage_dir}/{CLAIMS_DIR}/{name}")
            except (OSError, ValueError):
                continue  # being rewritten, or removed between listing and reading
            if isinstance(claim, dict) and claim_is_live(claim, now, self.stale_after):
                live.append(claim)
            else:
                storage.remove(f"{self.stage_dir}/{CLAIMS_DIR}/{name}")
        return live

    def runs_ahead(self) -> list[dict[str, Any]]:
        """The live claims of runs that started on this stage before this one (ties broken by token):
        the runs this one must not work beside. Two runs that start together agree on which is first."""
        mine = (self.started, self.token)
        return [c for c in self.other_live_claims() if (float(c.get("started", 0.0)), str(c.get("token"))) < mine]

    def wait_for_runs_ahead(self, poll_s: float = 2.0, on_wait: Any = None) -> None:
        """Block until no run ahead of this one holds the stage. A run ahead with other settings is
        refused at once (``ValueError``, one line): both would write the same blocks differently."""
        announced = False
        while True:
            ahead = self.runs_ahead()
            if not ahead:
                return
            other = ahead[0]
            since = time.strftime("%H:%M:%S", time.localtime(float(other.get("started", 0))))
            who = f"host {other.get('host')} pid {other.get('pid')}, started {since}"
            if other.get("settings", "") != self.settings:
                raise ValueError(f"{self.stage_dir}: another run with other settings is writing this stage ({who}); "
                                 "wait for it to end or give this run another run.output_dir")
            if not announced and on_wait is not None:
                on_wait(f"{self.stage_dir}: another run with the same settings is writing this stage ({who}); waiting "
                        "for it, then only what it left is done")
                announced = True
            time.sleep(poll_s)

    def remove_stale_temp_files(self) -> int:
        """Delete temp files that crashed writes left here, unless another run holds the stage.

        Returns how many went. Temps are listed *before* the other claims are read: a run that
        claimed the stage after that listing had not written any of the listed files.
        """
        temps = [n for n in storage.list_sizes(self.stage_dir) if n.startswith(TEMP_PREFIX)]
        for sub in self._temp_subdirs():
            temps += [f"{sub}/{n}" for n in storage.list_sizes(f"{self.stage_dir}/{sub}") if n.startswith(TEMP_PREFIX)]
        others = self.other_live_claims()  # always: it also clears the claims of dead runs
        if not temps or others:
            return 0
        for name in temps:
            storage.remove(f"{self.stage_dir}/{name}")
        return len(temps)

    def _temp_subdirs(self) -> list[str]:
        # the shard set writes into bucket-XXX/ and blocks/ folders; everything else writes at the top level
        return [n for n in storage.list_dirs(self.stage_dir) if n.startswith("bucket-") or n == "blocks"]
