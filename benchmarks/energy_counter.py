"""How NVML's energy counter behaves on this GPU: read it as fast as possible for a few seconds at idle and
report how often it changes (its update period), the smallest step, and the idle power it implies beside
NVML's own power reading.    python benchmarks/energy_counter.py OUT.json [SECONDS]"""

import itertools
import json
import sys
import time
from pathlib import Path

import pynvml


def main(out: Path, seconds: float = 3.0) -> None:
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    readings = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        readings.append((time.perf_counter(), pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)))
    power_mw = pynvml.nvmlDeviceGetPowerUsage(handle)
    pynvml.nvmlShutdown()
    changes = [now for before, now in itertools.pairwise(readings) if now[1] != before[1]]
    periods = [b[0] - a[0] for a, b in itertools.pairwise(changes)]
    steps = [b[1] - a[1] for a, b in itertools.pairwise(changes)]
    result = {
        "reads": len(readings),
        "changes": len(changes),
        "update_period_ms": 1000 * sum(periods) / len(periods) if periods else None,
        "smallest_step_mj": min(steps) if steps else None,
        "idle_power_from_counter_w": (readings[-1][1] - readings[0][1]) / 1000 / (readings[-1][0] - readings[0][0]),
        "nvml_power_usage_w": power_mw / 1000,
    }
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(float(arg) for arg in sys.argv[2:]))
