"""Where a job's wall time goes outside the timed calls, in the job's process and in its worker alike (so this
module imports nothing heavy: the job's process never imports torch)."""

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timeline:
    """Where a job's wall time goes outside the timed calls: seconds per named phase, wall clock, logged as
    ``time_<phase>_s`` (runner/catalogue.py names them). Phases that wait on the device say so themselves."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time_{name}_s": seconds for name, seconds in self.seconds.items()}
