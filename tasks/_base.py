"""What every cellmap2d task shares: one local-file output under the store, progress."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import luigi
from luigi.task import flatten

from ._config import store


class StoreTask(luigi.Task):
    """A task with one output (a file or a folder) under the store, written atomically.

    Complete when the output exists and is newer than the task's direct inputs and, for tasks
    that depend on a brain's anchoring, newer than that ``anchoring.json``: correct an anchoring
    by hand (QuickNII/VisuAlign) and rerun, and exactly the tasks downstream of it run again.
    (Other hand edits propagate one level per run; delete an output to force it.)
    """

    relative_path: str = ""
    depends_on_anchoring: bool = False

    def path(self) -> Path:
        return store() / self.relative_path.format(**self.param_kwargs)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.path()))

    def complete(self) -> bool:
        if not self.output().exists():
            return False
        built = os.path.getmtime(self.output().path)
        return not any(os.path.getmtime(p) > built for p in self.source_paths())

    def source_paths(self) -> list[str]:
        """Existing files this task's output was made from."""
        paths = [getattr(t, "path", None) for t in flatten(self.input())]
        paths += self.anchoring_paths()
        return [p for p in paths if p and os.path.isfile(p)]

    def anchoring_paths(self) -> list[str]:
        if not self.depends_on_anchoring:
            return []
        return [str(store() / "brains" / self.param_kwargs["brain_id"] / "anchoring.json")]

    def progress(self, message: str, percent: float | None = None) -> None:
        self.set_status_message(message)
        if percent is not None:
            self.set_progress_percentage(round(percent))


@StoreTask.event_handler(luigi.Event.START)
def _remove_stale_output(task: luigi.Task) -> None:
    """A task only runs when its output is missing or stale: clear a stale one first, so the
    atomic ``temporary_path()`` rename (which never overwrites) can put the new one in place."""
    if isinstance(task, StoreTask) and task.output().exists():
        path = task.output().path
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
