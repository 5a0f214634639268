"""What every cellmap2d task shares: one local-file output under the store, progress."""

from __future__ import annotations

from pathlib import Path

import luigi

from ._config import store


class StoreTask(luigi.Task):
    """A task with one output file under the store (written atomically)."""

    relative_path: str = ""

    def path(self) -> Path:
        return store() / self.relative_path.format(**self.param_kwargs)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.path()))

    def progress(self, message: str, percent: float | None = None) -> None:
        self.set_status_message(message)
        if percent is not None:
            self.set_progress_percentage(round(percent))
