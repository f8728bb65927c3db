"""The host a job measures on: which machine start it is, what else runs there, and which core the job's
GPU-launching thread may have.

- ``boot_id``: the kernel's id of this machine start; timings from different starts do not compare.
- ``JobRegistry``: each job's worker holds a lock file under ``cache_dir/running`` while it runs, so a job
  counts the runner's jobs on this host at once (``concurrent_jobs``).
- ``core_lease``: jobs on one host pin their launching threads to distinct physical cores, one lock per
  core (and its hyperthread siblings) under ``cache_dir/core-locks``, preferring the cores of the job's GPU's
  NUMA node: never two jobs on one core.
- ``CpuLoad`` and ``gpu_neighbours``: the CPU other processes used while the job was timed (from
  /proc/stat), and other processes on the job's GPU (from NVML); ``LaunchThread``, where the launching thread's
  time went (on a CPU, waiting for its core, its core stolen by the hypervisor) and how fast its core ran a fixed
  loop between the calls; ``gpu_reading``, the GPU's cumulative counters: its energy, and the time its clocks were
  held down by its power limit or its temperature.
"""

import fcntl
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from runner.gpus import nvidia_smi

HOST = socket.gethostname()
STAT = Path("/proc/stat")
THREAD_STAT = Path("/proc/thread-self/schedstat")  # the calling thread: ns on a CPU, ns waiting for one, slices
# Iterations of the fixed loop LaunchThread.probe times before each timed call: 0.79 ms of CPython on our CPU
# machine, 1.2-2.1 ms on an H200 host's pinned core (BENCHMARKS.md, "The launching core's speed"). Short, since the
# GPU idles through it inside the block whose energy and busy share are read.
CORE_LOOP = 20_000
# A host counts as busy when other processes used more than this share of its cores (at least half a core)
# while the job was timed: then the scheduler puts their threads on the job's cores too.
BUSY_SHARE = 0.25


def boot_id() -> str:
    """The kernel's id of this machine start, or "" where the system does not tell."""
    path = Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip() if path.is_file() else ""


def allowed_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


class JobRegistry:
    """Marks this process as a running job of the runner on this host while it is entered."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handle: IO | None = None

    def __enter__(self) -> "JobRegistry":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.folder / f"{HOST}-{os.getpid()}.lock", "w")  # held open as the mark itself
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            Path(self._handle.name).unlink(missing_ok=True)
            self._handle.close()

    def count(self) -> int:
        """How many jobs on this host are running now, this one included; stale marks are removed."""
        running = 0
        for path in self.folder.glob(f"{HOST}-*.lock"):
            try:
                with open(path) as probe:
                    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    path.unlink(missing_ok=True)  # nobody holds it: its job died without cleaning up
            except BlockingIOError:
                running += 1
            except FileNotFoundError:
                continue
        return running


@contextmanager
def core_lease(folder: Path, preferred: list[int]) -> Iterator[list[int]]:
    """Hold the first free core of ``preferred`` for the block, with its hyperthread siblings (a thread on a
    sibling shares the core's execution units and slows a launch-bound thread as much as one on the core
    itself), and yield them, the core to pin first; an empty list when every one is held."""
    folder.mkdir(parents=True, exist_ok=True)
    for core in preferred:
        handles = []
        for member in [core, *sorted(siblings(core) - {core})]:
            handle = open(folder / f"{HOST}-core{member}.lock", "w")  # noqa: SIM115 (held open as the lease)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                break
            handles.append(handle)
        else:
            try:
                yield [core, *sorted(siblings(core) - {core})]
            finally:
                for handle in handles:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()
            return
        for handle in handles:
            handle.close()
    yield []


def siblings(core: int) -> set[int]:
    """The hardware threads sharing ``core``'s physical core (itself included), as the kernel reports them."""
    listing = Path(f"/sys/devices/system/cpu/cpu{core}/topology/thread_siblings_list")
    return set(parse_cpulist(listing.read_text())) | {core} if listing.is_file() else {core}


def cores_near(gpu_uuid: str | None) -> list[int]:
    """The cores this process may use, those of ``gpu_uuid``'s NUMA node first, highest numbers first in each
    part (low-numbered cores are where the system's own work tends to run)."""
    allowed = allowed_cores()
    local = set(_numa_cores(gpu_uuid)) & set(allowed) if gpu_uuid else set()
    return sorted(local, reverse=True) + sorted(set(allowed) - local, reverse=True)


def _numa_cores(gpu_uuid: str) -> list[int]:
    for uuid, bus_id in nvidia_smi("uuid", "pci.bus_id"):
        if uuid == gpu_uuid:
            domain, _, rest = bus_id.lower().partition(":")
            cpulist = Path(f"/sys/bus/pci/devices/{domain[-4:]}:{rest}/local_cpulist")
            return parse_cpulist(cpulist.read_text()) if cpulist.is_file() else []
    return []


def parse_cpulist(text: str) -> list[int]:
    """The cores of a kernel cpulist such as ``0-15,32-47``."""
    cores: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cores.extend(range(int(first), int(last or first) + 1))
    return cores


class CpuLoad:
    """CPU time used by processes other than this one over a stretch of wall time, in cores."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        times = os.times()
        return time.monotonic(), _host_busy_s(), times.user + times.system

    def others_cores(self) -> float | None:
        """Cores' worth of CPU others used since this was made; None where /proc/stat is missing."""
        (wall0, busy0, own0), (wall1, busy1, own1) = self._start, self._now()
        if busy1 < 0 or wall1 <= wall0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))


def _host_busy_s() -> float:
    """Seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal); -1 without /proc."""
    if not STAT.is_file():
        return -1.0
    fields = [int(value) for value in STAT.read_text().split("\n", 1)[0].split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])  # idle (3) and iowait (4) are not busy
    return busy / os.sysconf("SC_CLK_TCK")


class LaunchThread:
    """Where the calling thread's wall time went over a stretch (made and read on the GPU-launching thread): the
    share of it on a CPU (``launch_thread_cpu_share``: launching, or spinning in a CUDA synchronisation), the share
    waiting in the run queue for its core (``launch_thread_wait_share``: another thread on that core), and for a
    pinned ``core`` the share of that core's time the hypervisor took for other guests
    (``pinned_core_steal_share``, /proc/stat's steal). On an H200 start an eager job's calls took 1.99-4.17 s pinned
    on an otherwise idle host, and nothing logged said why (BENCHMARKS.md, "Cold compiles shown cold"). Whatever
    /proc does not hold here is left out.

    And, where ``probe`` ran between the calls, how fast the core ran the same pure-Python loop each time
    (``launch_core_loop_ms``, the median, and ``launch_core_loop_cv``, its spread; ``series``, each call's as
    ``call_core_loop_ms``). On later H200 starts the thread above was on its core 99.97% of the time,
    never waiting and never stolen from, and its calls still took 2.3-4.2 s, while a longer loop took 21-43 ms on
    that core between them (BENCHMARKS.md, "The launching core's speed"): a cloud host's core can run at half
    speed for seconds at a time with nothing in /proc to say so, and an eager pipeline's launching is interpreter
    work like the loop."""

    def __init__(self, core: int | None) -> None:
        self.core = core
        self.loops_s: list[float] = []
        self._start = self._now()

    def probe(self) -> None:
        """Time the fixed loop on this thread, before a timed call (outside it)."""
        self.loops_s.append(core_loop_s())

    def _now(self) -> tuple[float, tuple[int, int] | None, tuple[int, int] | None]:
        return time.monotonic(), _thread_schedstat(), None if self.core is None else _core_steal(self.core)

    def metrics(self) -> dict[str, float]:
        (wall0, sched0, steal0), (wall1, sched1, steal1) = self._start, self._now()
        wall = wall1 - wall0
        shares: dict[str, float] = {}
        if wall <= 0:
            return shares
        if sched0 and sched1:
            shares["launch_thread_cpu_share"] = (sched1[0] - sched0[0]) / 1e9 / wall
            shares["launch_thread_wait_share"] = (sched1[1] - sched0[1]) / 1e9 / wall
        if steal0 and steal1 and steal1[1] > steal0[1]:
            shares["pinned_core_steal_share"] = (steal1[0] - steal0[0]) / (steal1[1] - steal0[1])
        if self.loops_s:
            shares["launch_core_loop_ms"] = statistics.median(self.loops_s) * 1e3
        if len(self.loops_s) > 1:
            shares["launch_core_loop_cv"] = statistics.pstdev(self.loops_s) / statistics.mean(self.loops_s)
        return shares

    def series(self) -> dict[str, list[float]]:
        """Each probed call's loop (ms), in call order; empty where ``probe`` never ran."""
        return {"call_core_loop_ms": [seconds * 1e3 for seconds in self.loops_s]} if self.loops_s else {}


def core_loop_s(iterations: int = CORE_LOOP) -> float:
    """Seconds the calling thread takes for ``iterations`` of a fixed pure-Python loop."""
    started = time.perf_counter()
    total = 0
    for value in range(iterations):
        total += value * value % 7
    return time.perf_counter() - started


def _thread_schedstat() -> tuple[int, int] | None:
    """The calling thread's ns on a CPU and ns waiting for one since it started; None where /proc lacks them."""
    try:
        on_cpu, waiting, *_ = THREAD_STAT.read_text().split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError):
        return None


def _core_steal(core: int) -> tuple[int, int] | None:
    """One core's ticks stolen by the hypervisor and all its ticks since boot (/proc/stat's cpuN line: user,
    nice, system, idle, iowait, irq, softirq, steal; guest time is inside user); None where it is missing."""
    try:
        line = next(line for line in STAT.read_text().splitlines() if line.startswith(f"cpu{core} "))
        fields = [int(value) for value in line.split()[1:9]]
    except (OSError, StopIteration, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


def busy_threshold_cores() -> float:
    return max(0.5, BUSY_SHARE * max(1, len(allowed_cores())))


def gpu_neighbours(gpu_uuid: str) -> list[int] | None:
    """Process ids on this GPU other than this process and its children; None where NVML cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
            pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML (CPU machines, old drivers): say nothing rather than guess
        return None
    own = os.getpid()
    if own not in pids:  # NVML sees another pid namespace: all but one of its processes are others
        return sorted(pids)[: max(0, len(pids) - 1)]
    return sorted(pid for pid in pids if pid != own and not _descends_from(pid, own))


@dataclass(frozen=True)
class GpuReading:
    """NVML's cumulative counters of one GPU at one moment; a field is None where this GPU or driver does not
    keep that counter."""

    energy_mj: float | None  # energy since the driver loaded (Volta and later)
    power_capped_ns: int | None  # time the clocks were held below those asked for by the power limit...
    thermal_capped_ns: int | None  # ...and by the temperature (NVML's violation counters)
    temperature_c: float | None  # the GPU's temperature now
    missing: dict[str, str] = field(default_factory=dict)  # why a counter is None, by field name
    # The driver's utilisation samples since a moment asked for, oldest first, each (its timestamp in epoch µs, the
    # percent of the period before it in which a kernel ran): its own buffer, so nothing polls while the GPU works.
    # It holds the last 71 on an H200 with driver 580 (one every ~200 ms: 14 s). Empty where not asked or not kept.
    busy_samples: tuple[tuple[int, float], ...] = ()


def gpu_reading(gpu_uuid: str, busy_since_us: int | None = None) -> tuple[GpuReading | None, str]:
    """The GPU's counters now, read in one NVML session, with its utilisation samples taken since
    ``busy_since_us`` (microseconds since the epoch, NVML's timestamps) where given; None and why where there is
    no NVML or no such GPU (CPU machines)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
            missing: dict[str, str] = {}

            def read(name: str, counter: Callable[[], Any]) -> Any:
                try:
                    return counter()
                except Exception as error:  # not kept here (an older GPU or driver): the others still are
                    missing[name] = f"{type(error).__name__}: {error}".strip(": ")
                    return None

            def violation(policy: str) -> Any:
                return pynvml.nvmlDeviceGetViolationStatus(handle, getattr(pynvml, policy))

            energy = read("energy_mj", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            power = read("power_capped_ns", lambda: violation("NVML_PERF_POLICY_POWER"))
            thermal = read("thermal_capped_ns", lambda: violation("NVML_PERF_POLICY_THERMAL"))
            temperature = read(
                "temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            )
            busy = []
            if busy_since_us is not None:
                busy = read("busy_samples", lambda: utilisation_samples(pynvml, handle, busy_since_us)) or []
            return GpuReading(
                energy_mj=None if energy is None else float(energy),
                power_capped_ns=None if power is None else int(power.violationTime),
                thermal_capped_ns=None if thermal is None else int(thermal.violationTime),
                temperature_c=None if temperature is None else float(temperature),
                missing=missing,
                busy_samples=tuple(busy),
            ), ""
        finally:
            pynvml.nvmlShutdown()
    except Exception as error:
        return None, f"{type(error).__name__}: {error}".strip(": ")


def utilisation_samples(pynvml: Any, handle: Any, since_us: int) -> list[tuple[int, float]]:
    """The GPU's utilisation samples the driver took after ``since_us``, oldest first, as (timestamp µs, percent).
    On an H200 with driver 580 it keeps these, but no clock samples (BENCHMARKS.md, "Power-capped at 1024 px")."""
    kind, samples = pynvml.nvmlDeviceGetSamples(handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, since_us)
    # NVML's value union, by its value type: 0 double, 1 unsigned int, 2 unsigned long, 3 unsigned long long...
    member = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")[kind]
    ordered = sorted((sample for sample in samples if sample.timeStamp > since_us), key=lambda sample: sample.timeStamp)
    return [(sample.timeStamp, float(getattr(sample.sampleValue, member))) for sample in ordered]


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is a child (or grandchild...) of ``ancestor``, e.g. a compiler's worker process."""
    for _ in range(32):
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False
