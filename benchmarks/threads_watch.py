"""Who ran on which core, sampled from /proc while something else runs: for the eager baseline whose calls took
1.99-4.17 s pinned to one core of an otherwise idle H200 host (BENCHMARKS.md, "Cold compiles shown cold").

    python3 benchmarks/threads_watch.py OUT.json [INTERVAL_S]      # until SIGTERM or SIGINT

Pins itself to core 0 so as not to sit on the core it watches. Every INTERVAL_S (0.25 s unless given) it reads
each core's ticks from /proc/stat (user, nice, system, idle, iowait, irq, softirq, steal) and every thread's
CPU ticks and the core it last ran on from /proc/*/task/*/stat, and writes at the end: per interval, each
core's tick deltas and the threads that ran (tid, pid, name, last core, ticks, the cores they may use), and
/proc/interrupts at both ends. A thread's ticks are put on the core it was last seen on: at 0.25 s intervals a
thread that moved between cores is misplaced for part of one interval, and a core's busy ticks with no thread
seen there were someone's who moved or ended. Summarise with ``summarise(watch, core, t0, t1)``.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

PROC = Path("/proc")


def core_ticks() -> dict[int, list[int]]:
    """Each core's /proc/stat ticks: user, nice, system, idle, iowait, irq, softirq, steal."""
    cores = {}
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *fields = line.split()
            cores[int(name[3:])] = [int(value) for value in fields[:8]]
    return cores


def thread_ticks() -> dict[int, tuple[int, str, int, int]]:
    """Every thread's (pid, name, ticks on a CPU, the core it last ran on), by thread id."""
    threads = {}
    for task in PROC.glob("[0-9]*/task/[0-9]*/stat"):
        try:
            text = task.read_text()
        except OSError:  # it ended
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()  # fields from the third (state) on
        threads[int(task.parent.name)] = (int(task.parts[2]), name, int(fields[11]) + int(fields[12]), int(fields[36]))
    return threads


def allowed_cores(pid: int, tid: int) -> str:
    try:
        status = (PROC / str(pid) / "task" / str(tid) / "status").read_text()
    except OSError:
        return "?"
    return next((line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")), "?")


def watch(out: Path, interval: float) -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    os.sched_setaffinity(0, {0})
    interrupts = [(PROC / "interrupts").read_text()]
    samples, allowed = [], {}
    cores0, threads0 = core_ticks(), thread_ticks()
    while not stop:
        time.sleep(interval)
        now, cores1, threads1 = time.time(), core_ticks(), thread_ticks()
        ran = []
        for tid, (pid, name, ticks, core) in threads1.items():
            before = threads0.get(tid)
            delta = ticks - (before[2] if before and before[0] == pid else 0)
            if delta > 0:
                if tid not in allowed:
                    allowed[tid] = allowed_cores(pid, tid)
                ran.append([tid, pid, name, core, delta, allowed[tid]])
        deltas = {
            core: [b - a for a, b in zip(cores0[core], ticks, strict=True)]
            for core, ticks in cores1.items()
            if core in cores0
        }
        samples.append({"t": now, "cores": deltas, "threads": ran})
        cores0, threads0 = cores1, threads1
    interrupts.append((PROC / "interrupts").read_text())
    out.write_text(
        json.dumps(
            {
                "interval_s": interval,
                "tick_s": 1 / os.sysconf("SC_CLK_TCK"),
                "samples": samples,
                "interrupts": interrupts,
            }
        )
    )


def summarise(watch: dict, core: int, t0: float, t1: float) -> dict:
    """Over the samples ending in [t0, t1]: ``core``'s ticks by kind, and the threads' ticks put on it."""
    kinds = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    totals = dict.fromkeys(kinds, 0)
    threads: dict[str, int] = {}
    for sample in watch["samples"]:
        if not t0 <= sample["t"] <= t1:
            continue
        for kind, ticks in zip(kinds, sample["cores"].get(str(core), [0] * 8), strict=True):
            totals[kind] += ticks
        for tid, pid, name, last, ticks, allowed in sample["threads"]:
            if last == core:
                key = f"{name} (pid {pid}, tid {tid}, allowed {allowed})"
                threads[key] = threads.get(key, 0) + ticks
    return {"core_ticks": totals, "threads": dict(sorted(threads.items(), key=lambda item: -item[1]))}


if __name__ == "__main__":
    watch(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.25)
