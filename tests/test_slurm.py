"""Beyond one host: sweeps through hydra/launcher=slurm against a real single-node SLURM (tests/slurm_cluster.py)
and a real MLflow server, read back through the server; and what fails on a cluster, failing clearly."""

import itertools
import json
import operator
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import submitit
from conftest import ROOT, mlflow_server
from slurm_cluster import PARTITION, Cluster, missing

from runner import job as job_module
from runner import slurm
from runner.config import MlflowConfig
from runner.record import Outcome
from runner.sweep import launch_problem
from runner.tracking import Tracker

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster, one test at a time
LAUNCHER = (
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.gpus_per_node=0",  # a CPU-only test cluster
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = missing()
    if why:
        pytest.skip(why)
    running = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            running.start()
        except RuntimeError as error:
            pytest.skip(f"SLURM could not be started here: {error}")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(folder, f"sqlite:///{folder}/mlflow.db") as url:
        yield url


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=30))


def runs_of(server: str, experiment: str, kind: str = "job") -> list[dict]:
    found = rest(server, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")["experiment"]
    body = {"experiment_ids": [found["experiment_id"]], "filter": f"tags.kind = '{kind}'", "max_results": 100}
    runs = rest(server, "/api/2.0/mlflow/runs/search", body).get("runs", [])
    for run in runs:
        run["tags"] = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    return runs


def test_a_sweep_through_slurm_reads_back_through_the_server(cli, cluster: Cluster, server: str) -> None:
    sweep = cli(
        "-m", *LAUNCHER, "res=64,72", "runs=2", "mlflow.experiment=slurm", tracking_uri=server, env=cluster.env()
    )
    assert sweep.code == 0, sweep.output
    runs = runs_of(server, "slurm")
    assert {run["info"]["run_name"] for run in runs} == {"tiny/t2i/64/none", "tiny/t2i/72/none"}
    for run in runs:
        assert run["info"]["status"] == "FINISHED" and run["tags"]["outcome"] == "ok"
        assert re.fullmatch(r"\d+_[01]", run["tags"]["slurm_job_id"])  # an array job's task, recorded
        listed = rest(server, f"/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}&path=images")
        assert len(listed["files"]) == 2
    [parent] = runs_of(server, "slurm", kind="sweep")
    assert parent["info"]["status"] == "FINISHED" and "tiny/t2i/72/none" in parent["tags"]["mlflow.note.content"]
    assert "\nSweep " in sweep.output and "tiny/t2i/64/none  ok" in sweep.output  # the table
    report = rest(server, f"/api/2.0/mlflow/artifacts/list?run_id={parent['info']['run_id']}&path=report")
    assert "report/report.html" in {f["path"] for f in report["files"]}


def test_a_job_s_runs_share_one_task_and_its_baseline_comes_again(
    cli, cluster: Cluster, server: str, test_accelerators: str
) -> None:
    """Each GPU slot's jobs run one after another in one task of the job array (hydra_plugins/runner_slurm): a
    job's baseline, its accelerated run and its baseline measured again share a node, its GPU and its machine start,
    so the run is compared with the newest of them; another job's slot is another task."""
    sweep = cli(
        "-m",
        *LAUNCHER,
        "hydra.launcher.array_parallelism=1",  # one host: two tasks at once would each count the other's jobs
        "accelerator=none,same",
        "res=64,72",
        "runs=1",
        "rebaseline=always",  # on the CPU no GPU busy share says whether to
        "mlflow.experiment=slots",
        test_accelerators,
        tracking_uri=server,
        env=cluster.env(),
    )
    assert sweep.code == 0, sweep.output
    runs = {run["info"]["run_name"]: run for run in runs_of(server, "slots")}
    assert set(runs) == {f"tiny/t2i/{res}/{name}" for res in (64, 72) for name in ("none", "same", "none again")}
    tasks = set()
    for res in (64, 72):
        first, same, again = (runs[f"tiny/t2i/{res}/{name}"] for name in ("none", "same", "none again"))
        assert first["tags"]["slurm_job_id"] == same["tags"]["slurm_job_id"] == again["tags"]["slurm_job_id"]
        tasks.add(first["tags"]["slurm_job_id"])
        assert int(first["info"]["end_time"]) <= int(same["info"]["start_time"])
        assert int(same["info"]["end_time"]) <= int(again["info"]["start_time"])
        assert again["tags"]["baseline_again"] == first["info"]["run_id"]
        assert same["tags"]["baseline_run"] == again["info"]["run_id"], same["tags"].get("baseline_why")
    assert len(tasks) == 2
    assert "SLURM task 1: job(s) #1, #4, #5, in this order" in sweep.output
    # each job's line under its own number, once (submitit's launcher would number the tasks as jobs)
    assert re.search(r"\t#3 : accelerator=none res=64 .* baseline_again=true gpu_slot=0\n", sweep.output)
    assert [sweep.output.count(f"\t#{index} : ") for index in range(6)] == [1] * 6


def test_a_failed_task_is_one_line_with_its_error_and_its_log(tmp_path: Path) -> None:
    """submitit's error for a task that raised spans its trace: the sweep's line keeps the error and the log's path
    (a real one: submitit's local executor runs the task in a process of its own)."""
    job = submitit.LocalExecutor(folder=tmp_path).submit(operator.truediv, 1, 0)
    with pytest.raises(Exception) as raised:
        job.result()
    line = launch_problem(raised.value)
    assert line.startswith("the sweep stopped early: a task failed: ZeroDivisionError: division by zero (its log: ")
    assert line.endswith("_log.err)") and "\n" not in line


def test_a_partition_that_does_not_exist_is_one_line(cli, cluster: Cluster, server: str) -> None:
    sweep = cli(
        "-m",
        *LAUNCHER,
        "hydra.launcher.partition=gpu-nope",
        "res=64",
        "runs=1",
        "mlflow.experiment=nope",
        tracking_uri=server,
        env=cluster.env(),
    )
    assert sweep.code == 1
    assert "WARNING: SLURM refused the sweep's jobs: " in sweep.output
    assert "invalid partition specified: gpu-nope (check hydra.launcher.partition" in sweep.output
    assert "Traceback" not in sweep.output
    [parent] = runs_of(server, "nope", kind="sweep")
    assert parent["info"]["status"] == "FAILED"


def test_a_job_at_its_time_limit_is_closed_with_the_reason(cli, cluster: Cluster, server: str) -> None:
    """submitit ends a job when SLURM warns that its time limit is near (SIGUSR2, signal_delay_s before it, give or
    take SLURM's minute: here 0-60 s into a 2-minute limit): the run is closed as KILLED saying so, and the
    sweep stops waiting for it."""
    sweep = cli(
        "-m",
        *LAUNCHER,
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60",
        "res=64",
        "runs=100000",
        "mlflow.experiment=timelimit",
        tracking_uri=server,
        env=cluster.env(),
        timeout=400,
    )
    assert sweep.code == 1, sweep.output
    assert "1 of 1 job(s) stopped: tiny/t2i/64/none; run the same command again" in sweep.output  # not "failed"
    [run] = runs_of(server, "timelimit")
    assert run["info"]["status"] == "KILLED", sweep.output
    [parent] = runs_of(server, "timelimit", kind="sweep")  # FAILED: the launcher's wait ended in a problem
    assert (parent["tags"]["jobs_stopped"], parent["tags"]["jobs_failed"]) == ("1", "0")
    limit = r"stopped after 00:0\d:\d\d of its SLURM time limit \(00:02:00\): submitit ends a job when SLURM warns"
    assert re.match(limit, run["tags"]["error"]) and "raise hydra.launcher.timeout_min" in run["tags"]["error"]


def test_why_slurm_stopped_a_job_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = {"JobState": "COMPLETING", "Reason": "TimeLimit", "TimeLimit": "00:01:00", "RunTime": "00:01:05"}
    monkeypatch.setattr(slurm, "_show", lambda job: shown)  # scontrol, at SLURM's own SIGTERM for the limit
    assert slurm.why_stopped("12") == "stopped by SLURM: its time limit (00:01:00) was reached after 00:01:05"
    monkeypatch.setattr(slurm, "_show", lambda job: {**shown, "JobState": "CANCELLED", "Reason": "None"})
    assert slurm.why_stopped("12") == "stopped by SLURM (job 12: CANCELLED, reason None)"
    monkeypatch.setattr(slurm, "_show", lambda job: {})  # no scontrol: nothing said
    assert slurm.why_stopped("12") == ""


def test_a_job_array_larger_than_its_parallelism_runs_one_job_at_a_time(cli, cluster: Cluster, server: str) -> None:
    sweep = cli(
        "-m",
        *LAUNCHER,
        "hydra.launcher.array_parallelism=1",
        "res=64,72,80",
        "runs=1",
        "mlflow.experiment=array",
        tracking_uri=server,
        env=cluster.env(),
    )
    assert sweep.code == 0, sweep.output
    runs = sorted(runs_of(server, "array"), key=lambda run: int(run["info"]["start_time"]))
    assert len(runs) == 3 and {run["info"]["status"] for run in runs} == {"FINISHED"}
    for before, after in itertools.pairwise(runs):
        assert int(before["info"]["end_time"]) <= int(after["info"]["start_time"])  # never two at once


def test_a_node_lost_mid_job_leaves_a_run_the_next_sweep_closes(cluster: Cluster, server: str, tmp_path: Path) -> None:
    args = [*LAUNCHER, "res=64", "mlflow.experiment=lost", f"mlflow.tracking_uri={server}", f"cache_dir={tmp_path}/c"]
    command = [sys.executable, "-m", "runner", "-m", *args, f"hydra.sweep.dir={tmp_path}/hydra"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **cluster.env()}
    submitter = subprocess.Popen(
        [*command, "runs=100000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while not any(r["info"]["status"] == "RUNNING" for r in runs_of_or_none(server, "lost")):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(2)
    time.sleep(5)  # well into its timed calls
    cluster.lose_node()
    submitter.kill()  # the login node's view: nobody is left to close the run
    submitter.wait()
    [lost] = runs_of(server, "lost")
    assert lost["info"]["status"] == "RUNNING"  # nothing could close it; it does not look finished
    cluster.start_node()  # the node comes back
    again = subprocess.run([*command, "runs=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    closed = {r["info"]["run_id"]: r for r in runs_of(server, "lost")}[lost["info"]["run_id"]]
    assert closed["info"]["status"] == "KILLED" and closed["tags"]["error"].startswith("abandoned: its job process")


def runs_of_or_none(server: str, experiment: str) -> list[dict]:
    try:
        return runs_of(server, experiment)
    except urllib.error.HTTPError:  # the experiment does not exist yet
        return []


def test_a_run_on_a_lost_node_elsewhere_is_closed_when_slurm_no_longer_runs_its_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another node: the run's host cannot be asked, SLURM can (a stand-in squeue here)."""
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir()
    squeue.write_text(
        '#!/bin/sh\ncase "$*" in *41_0*) echo RUNNING;;\n'
        "*) echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1;; esac\n"
    )
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{squeue.parent}:{os.environ['PATH']}")
    tracker = Tracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    elsewhere = {"host": "node-17", "pid": "4242", "boot_id": "b"}
    alive = tracker.start_job("a/t2i/64/none", {}, "", {**elsewhere, "slurm_job_id": "41_0"})
    lost = tracker.start_job("a/t2i/72/none", {}, "", {**elsewhere, "slurm_job_id": "40_1"})
    job_module.close_abandoned(tracker)
    assert tracker.record(alive).outcome is Outcome.RUNNING
    assert tracker.record(lost).outcome is Outcome.KILLED
    assert tracker.record(lost).why == "abandoned: SLURM no longer runs its job 40_1 (on node-17: a node lost mid-job?)"
