"""The one tracking interface steps log through; the caller injects an implementation (MLflow lives in flows/)."""
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], *, step: int | None = None) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def log_dataset(self, *, name: str, source: str, revision: str, digest: str, num_rows: int, context: str) -> None: ...


class NullTracker:
    """Drops everything: keeps one logging call site in steps run without tracking."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def log_dataset(self, *, name: str, source: str, revision: str, digest: str, num_rows: int, context: str) -> None:
        pass
