"""A real single-node SLURM for the tests, from Debian's packages (slurm-wlm, munge): munged, slurmctld and
slurmd started as the test's own processes on 127.0.0.1 with their own key, ports and state folder, and
stopped at its end. SLURM's accounting database (slurmdbd) is not set up: submitit's calls to ``sacct`` are
answered from ``scontrol`` by ``tests/slurm/sacct``, which ``env`` puts first on PATH."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import ROOT, free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str:
    """Why a SLURM cannot be started here, or an empty string."""
    found = {name: shutil.which(name) or shutil.which(f"/usr/sbin/{name}") for name in DAEMONS}
    if not all(found.values()):
        absent = ", ".join(name for name, path in found.items() if not path)
        return f"SLURM is not installed ({absent}: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd runs jobs as their users only as root"
    return ""


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.node = socket.gethostname().split(".")[0]
        self.conf = folder / "slurm.conf"
        self.processes: dict[str, subprocess.Popen] = {}

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "PATH": f"{ROOT / 'tests' / 'slurm'}:{os.environ['PATH']}"}

    def start(self) -> None:
        for part in ("state", "spool", "munge"):
            (self.folder / part).mkdir(parents=True, exist_ok=True)
        (self.folder / "munge").chmod(0o700)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.folder / "munge" / "munge.socket"
        files = [f"--key-file={key}", f"--socket={socket_path}", f"--seed-file={key}.seed"]
        files += [f"--pid-file={self.folder}/munge/munged.pid", f"--log-file={self.folder}/munge/munged.log"]
        self._spawn("munged", ["munged", "-F", "-f", *files])
        self._wait(lambda: socket_path.exists(), "munged")
        ports = {"ctld": free_port(), "d": free_port()}
        values = {"folder": self.folder, "node": self.node, "socket": socket_path, "cpus": os.cpu_count(), **ports}
        self.conf.write_text(CONF.format(**values))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self.start_node()

    def start_node(self) -> None:
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.sinfo() in ("idle", "mix", "alloc"), "slurmd (node idle)")

    def lose_node(self) -> None:
        """What losing the node looks like: slurmd and every process of its jobs killed at once."""
        self.processes.pop("slurmd").kill()
        for job in self.run(["squeue", "-h", "-o", "%A"]).split():
            pids = [line.split()[0] for line in self.run(["scontrol", "listpids", job]).splitlines()[1:] if line]
            for pid in [int(p) for p in pids if p.isdigit()] + stepds(job, self.conf):  # PID JOBID STEPID ... lines
                if pid > 1 and pid != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def sinfo(self) -> str:
        return self.run(["sinfo", "-h", "-o", "%t"]).strip().rstrip("*~#")

    def run(self, command: list[str]) -> str:
        return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **self.env()}).stdout

    def stop(self) -> None:
        jobs = self.run(["squeue", "-h", "-o", "%A"]).split()
        self.run(["scancel", "--full", f"--partition={PARTITION}"])
        for process in reversed(list(self.processes.values())):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in [pid for job in jobs for pid in stepds(job, self.conf)]:  # what a lost node left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.folder / f"{name}.out", "w")  # noqa: SIM115 (the daemon's output for as long as it runs)
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env()}
        )

    def _wait(self, ready, what: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if time.monotonic() > deadline:
                logs = {p.name: p.read_text()[-800:] for p in self.folder.glob("*.out")}
                raise RuntimeError(f"{what} did not come up: {logs}")
            time.sleep(0.5)


def stepds(job: str, conf: Path) -> list[int]:
    """The slurmstepd processes of ``job`` on the cluster of ``conf`` (they outlive slurmd). Each test worker has
    its own cluster, and all of them number their jobs from 1: matched by name alone, one worker's teardown once
    killed the other's job 3 mid-step (its srun then waited until the test timed out), so a process counts only
    where its environment names this cluster's configuration, as slurmd hands it on."""
    found = subprocess.run(["pgrep", "-f", f"slurmstepd: \\[{job}\\."], capture_output=True, text=True).stdout
    ours = f"SLURM_CONF={conf}".encode()
    pids = []
    for pid in [int(pid) for pid in found.split()]:
        with contextlib.suppress(OSError):
            if ours in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
    return pids


PARTITION = "debug"
CONF = """ClusterName=runnertest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
SlurmdPort={d}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=0
KillWait=5
MinJobAge=600
MpiDefault=none
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
