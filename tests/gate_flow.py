"""A flow that runs until the test opens its gate (a file appears): a run that is provably still going, for the
deployment concurrency test in tests/test_deployments.py."""
import time
from pathlib import Path

from prefect import flow


@flow(name="gate")
def gate(path: str) -> str:
    while not Path(path).exists():
        time.sleep(0.5)
    return Path(path).read_text()
