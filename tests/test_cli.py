"""The command a user types, end to end on the CPU: real sweeps of tiny pipelines, read back from MLflow."""

import ast
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from runner.config import MlflowConfig
from runner.job import time_summary
from runner.record import Outcome
from runner.sweep import (
    baselines_after,
    by_gpu_slot,
    last_concurrency,
    second_batches,
    with_baseline_again,
    with_gpu_slots,
)
from runner.tracking import Tracker

REQUIRED_PARAMS = {
    "model",
    "model_id",
    "weights",
    "task",
    "res",
    "height",
    "width",
    "accelerator",
    "steps",
    "guidance_scale",
    "seed",
    "warmup",
    "runs",
    "device",
    "dtype",
    "denoiser_params",
}
REQUIRED_METRICS = {
    "load_s",
    "warmup_s",
    "latency_s",
    "latency_p50_s",
    "latency_p90_s",
    "latency_std_s",
    "its",
    "text_encode_s",
    "denoise_s",
    "decode_s",
    "denoiser_tflop_per_step",
    "achieved_tflops",
    "peak_rss_gib",
    "latency_cv",
    "call_latency_s",
}
REQUIRED_TAGS = {
    "sweep_id",
    "outcome",
    "device_name",
    "torch_version",
    "diffusers_version",
    "transformers_version",
    "git_commit",
    "git_tree",
    "python_version",
}


def artifact_image(client: MlflowClient, run_id: str, path: str) -> Image.Image:
    local = client.download_artifacts(run_id, path)
    return Image.open(io.BytesIO(Path(local).read_bytes()))


def test_tiny_sweep_of_both_tasks_reads_back_from_mlflow(cli) -> None:
    sweep = cli("-m", "model=tiny_sdxl,tiny_pix2pix", "task=t2i,i2i", "res=64", "runs=3", "task.image=t2i:tiny_sdxl")
    assert sweep.code == 0, sweep.output
    runs = sweep.runs()
    assert set(runs) == {
        "tiny/t2i/64/none",
        "tiny/i2i/64/none",
        "tp2p/t2i/64/none",
        "tp2p/i2i/64/none",
    }
    assert len({run.data.tags["sweep_id"] for run in runs.values()}) == 1

    skipped = runs["tp2p/t2i/64/none"]
    assert skipped.data.tags["outcome"] == "skipped" and skipped.info.status == "FINISHED"
    assert skipped.data.tags["skip_reason"] == "model tiny_pix2pix has no t2i pipeline (it offers: i2i)"

    client = MlflowClient(sweep.tracking_uri)
    t2i = runs["tiny/t2i/64/none"]
    for name in ("tiny/t2i/64/none", "tiny/i2i/64/none", "tp2p/i2i/64/none"):
        run = runs[name]
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        assert run.info.status == "FINISHED" and tags["outcome"] == "ok"
        assert set(params) >= REQUIRED_PARAMS and set(metrics) >= REQUIRED_METRICS and set(tags) >= REQUIRED_TAGS
        assert (params["res"], params["height"], params["width"], params["device"], params["dtype"]) == (
            "64",
            "64",
            "64",
            "cpu",
            "fp32",
        )
        assert params["accelerator"] == "none" and params["weights"] == "random" and params["runs"] == "3"
        # Sane numbers: positive, phases add up, it/s is steps over denoising seconds.
        assert 0 < metrics["latency_p50_s"] <= metrics["latency_p90_s"] < 60
        phases = metrics["text_encode_s"] + metrics["denoise_s"] + metrics["decode_s"]
        assert phases == pytest.approx(metrics["latency_s"], rel=1e-6)
        assert metrics["its"] == pytest.approx(metrics["denoise_steps"] / metrics["denoise_s"], rel=1e-6)
        assert metrics["denoiser_tflop_per_step"] > 0 and metrics["peak_rss_gib"] > 0.1
        # Where the job's wall time went: the measured parts and the runner's own add up to the wall time.
        calls = [m.value for m in client.get_metric_history(run.info.run_id, "call_latency_s")]
        measured = metrics["load_s"] + metrics["accelerate_s"] + metrics["warmup_s"] + sum(calls)
        measured += metrics.get("time_queued_s", 0.0)
        assert metrics["overhead_s"] == pytest.approx(metrics["job_wall_s"] - measured, abs=1e-6)
        own = [key for key in metrics if key.startswith("time_")]
        phases = {"time_start_s", "time_setup_s", "time_collect_s", "time_flops_s", "time_quality_s", "time_record_s"}
        assert phases <= set(own)
        assert all(metrics[key] >= 0 for key in own)
        assert sum(metrics[key] for key in own if key not in ("time_queued_s", "time_timed_s")) < metrics["job_wall_s"]
        history = client.get_metric_history(run.info.run_id, "call_latency_s")
        assert [m.step for m in history] == [0, 1, 2]
        # Three images of the job's size, the resolved config and the worker's log.
        images = sorted(a.path for a in client.list_artifacts(run.info.run_id, "images"))
        assert images == ["images/000_p00_seed0.png", "images/001_p00_seed1.png", "images/002_p00_seed2.png"]
        assert artifact_image(client, run.info.run_id, images[0]).size == (64, 64)
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "worker.log"} <= top
    assert runs["tiny/i2i/64/none"].data.params["call.strength"] == "0.75"
    assert runs["tiny/i2i/64/none"].data.metrics["denoise_steps"] == 3  # int(4 steps x 0.75)
    for name in ("tiny/i2i/64/none", "tp2p/i2i/64/none"):  # the input is the t2i run's first image
        assert runs[name].data.tags["input_image"].startswith(f"run {t2i.info.run_id} ")
    assert "tiny/t2i/64/none" in sweep.output.split("Sweep ")[-1]  # the summary table
    assert "[tiny/t2i/64/none] wall " in sweep.output and "the runner's own " in sweep.output


def test_one_failing_job_leaves_the_sweep_running_and_the_exit_code_non_zero(cli) -> None:
    sweep = cli("-m", "res=64,100", "runs=1")
    assert sweep.code != 0
    runs = sweep.runs()
    assert runs["tiny/t2i/64/none"].data.tags["outcome"] == "ok"
    failed = runs["tiny/t2i/100/none"]
    assert failed.info.status == "FAILED" and failed.data.tags["outcome"] == "failed"
    assert failed.data.tags["error"] == "res=100: must be a positive multiple of 8, e.g. 512 or 1024"
    assert "1 of 2 job(s) failed: tiny/t2i/100/none" in sweep.output
    assert "Traceback" not in sweep.output


def test_unknown_model_or_task_in_a_sweep_is_recorded_and_the_rest_runs(cli) -> None:
    sweep = cli("-m", "model=tiny_sdxl,no_such_model", "task=t2i,paint", "res=64", "runs=1")
    assert sweep.code != 0
    runs = sweep.runs()
    assert runs["tiny/t2i/64/none"].data.tags["outcome"] == "ok"
    error = runs["no_such_model/t2i/64/none"].data.tags["error"]
    assert error.startswith("model=no_such_model: no such model; choose one of instruct_pix2pix, realvisxl_v4")
    assert "conf/model/no_such_model.yaml" in error
    assert runs["tiny/paint/64/none"].data.tags["error"].startswith("task=paint: no such task; choose one of i2i, t2i")
    assert "4 job(s)" in sweep.output and "3 of 4 job(s) failed" in sweep.output


def test_unknown_model_on_its_own_lists_the_options(cli) -> None:
    sweep = cli("model=no_such_model")
    assert sweep.code == 2 and sweep.output.startswith("error: model=no_such_model: no such model; choose one of")
    assert "realvisxl_v4_lightning" in sweep.output and "conf/model/no_such_model.yaml" in sweep.output


def test_value_that_is_not_a_number_in_a_sweep(cli) -> None:
    sweep = cli("-m", "res=64,large", "runs=1")
    assert sweep.code != 0
    error = sweep.runs()["tiny/t2i/large/none"].data.tags["error"]
    assert error == "res=large: res takes a whole number (python -m runner --help describes every key)"
    assert "1 of 2 job(s) failed" in sweep.output  # the other value's job ran


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("runs=0",), "runs=0: must be at least 1"),
        (("task=i2i", "task.image=/no/such/image.png"), "task.image=/no/such/image.png: no such file"),
        (("task=i2i", "task.image=t2i"), "task.image=t2i: no finished t2i run of tiny_sdxl at 64x64"),
    ],
)
def test_bad_input_fails_the_job_with_one_line(cli, args: tuple[str, ...], error: str) -> None:
    sweep = cli(*args, "res=64")
    assert sweep.code != 0
    [run] = sweep.runs().values()
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith(error)
    assert "\n" not in run.data.tags["error"] and "Traceback" not in sweep.output


def test_the_issue_command_sweeps_four_jobs_and_reports_the_unreachable_hub(cli) -> None:
    """The exact command from the brief; with no hub every job fails fast, each saying what to do."""
    sweep = cli("-m", "model=realvisxl_v4,realvisxl_v4_lightning", "res=512,1024")
    assert sweep.code != 0
    runs = sweep.runs()
    assert set(runs) == {f"{m}/t2i/{r}/none" for m in ("RV4", "RV4L") for r in (512, 1024)}  # the models' labels
    for run in runs.values():
        assert run.info.status == "FAILED"
        assert "could not be loaded" in run.data.tags["error"] and "model.weights=random" in run.data.tags["error"]
    assert runs["RV4L/t2i/512/none"].data.params["model_id"] == "SG161222/RealVisXL_V4.0_Lightning"


def test_pretrained_tiny_pipeline_from_a_local_folder(cli, tiny_sdxl_folder: Path) -> None:
    sweep = cli(
        "model.weights=pretrained", f"model.id={tiny_sdxl_folder}", "res=64", "runs=1", "quality.clip_model=tiny"
    )
    assert sweep.code == 0, sweep.output
    [run] = sweep.runs().values()
    assert run.data.params["weights"] == "pretrained" and run.data.params["model_id"] == str(tiny_sdxl_folder)
    assert run.data.tags["clip_score_meaningful"] == "false: tiny CLIP"


def test_quality_failure_keeps_the_timings(cli, tiny_sdxl_folder: Path) -> None:
    """Offline, the pinned CLIP model cannot load: the job fails saying how, with its timings kept."""
    sweep = cli("model.weights=pretrained", f"model.id={tiny_sdxl_folder}", "res=64", "runs=1")
    assert sweep.code != 0
    [run] = sweep.runs().values()
    assert run.data.tags["error"].startswith("quality.clip_model=openai/clip-vit-base-patch16 could not be loaded")
    assert run.data.metrics["latency_s"] > 0


def test_each_baseline_comes_again_after_its_job_s_last_accelerated_run() -> None:
    def jobs(rebaseline: str = "auto") -> list[tuple[list[str], bool, str]]:
        grid = [("none", "512"), ("none", "1024"), ("x", "512"), ("x", "1024"), ("none", "768")]
        return [([f"accelerator={a}", f"res={r}"], a == "none", rebaseline) for a, r in grid]

    assert with_gpu_slots(with_baseline_again(jobs())) == [
        ["accelerator=none", "res=512", "gpu_slot=0"],
        ["accelerator=none", "res=1024", "gpu_slot=1"],
        ["accelerator=x", "res=512", "gpu_slot=0"],
        ["accelerator=none", "res=512", "baseline_again=true", "gpu_slot=0"],  # on its job's GPU
        ["accelerator=x", "res=1024", "gpu_slot=1"],
        ["accelerator=none", "res=1024", "baseline_again=true", "gpu_slot=1"],
        ["accelerator=none", "res=768", "gpu_slot=2"],  # a baseline with nothing to compare: once
    ]
    # Under SLURM each slot is one task, its jobs in this order: the baseline, its accelerated run, the baseline again
    assert by_gpu_slot(with_gpu_slots(with_baseline_again(jobs()))) == [[0, 2, 3], [1, 4, 5], [6]]
    assert by_gpu_slot([["res=512"], ["res=512", "gpu_slot=0"], ["res=512"]]) == [[0], [1], [2]]  # no slot: alone
    # never too: that slot measures a baseline a resumed sweep found done on another machine start (and only that)
    assert with_baseline_again(jobs("never")) == with_baseline_again(jobs())
    assert with_baseline_again(jobs("sometimes")) == [o for o, _, _ in jobs()]
    last = [(["accelerator=x", "res=512"], False, "auto"), (["accelerator=none", "res=512"], True, "auto")]
    assert with_baseline_again(last) == [["accelerator=x", "res=512"], ["accelerator=none", "res=512"]]
    # Side by side (local_gpus), in no set order: a batch of their own, after the jobs, on their jobs' GPUs
    slotted = with_gpu_slots([o for o, _, _ in jobs()])
    stamped = [(overrides, b, r) for overrides, (_, b, r) in zip(slotted, jobs(), strict=True)]
    assert baselines_after(stamped) == [
        ["accelerator=none", "res=512", "gpu_slot=0", "baseline_again=true"],
        ["accelerator=none", "res=1024", "gpu_slot=1", "baseline_again=true"],
    ]
    assert baselines_after(last) == [["accelerator=none", "res=512", "baseline_again=true"]]  # wherever it stood
    assert baselines_after([(o, b, "sometimes") for o, b, _ in stamped]) == []


def test_side_by_side_second_slots_run_as_many_at_once_as_their_jobs_last_runs(tmp_path: Path) -> None:
    """A run left alone on its GPU at a sweep's end is compared only with a baseline measured alone (the most jobs
    at once must match), so the baselines' second slots run in batches of as many as their jobs' last runs had."""
    after = [["accelerator=none", f"res={64 + slot}", f"gpu_slot={slot}", "baseline_again=true"] for slot in range(3)]
    assert second_batches(after, {0: 2, 1: 1, 2: 2}) == [[after[0], after[2]], [after[1]]]  # 2 side by side, 1 alone
    assert second_batches(after, {0: 1, 1: 1, 2: 1}) == [[after[0]], [after[1]], [after[2]]]
    assert second_batches(after, {0: 3, 1: 3, 2: 3}) == second_batches(after, {}) == [after]  # no run read: at once
    assert second_batches(after, {0: 2, 1: 2, 2: 2}) == [[after[0], after[1]], [after[2]]]  # the last one short
    assert second_batches(after[:1], {0: 4}) == [after[:1]]  # more than there are to run: all at once
    # Read back from the sweep's runs: each slot's last finished accelerated run, by its start
    tracker = Tracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="slots"))
    sweep_id = tracker.start_sweep("sweep", "-m ...", {})
    runs = [  # (accelerator, slot, jobs at once, outcome)
        ("none", 0, 2, Outcome.OK), ("x", 0, 2, Outcome.OK), ("y", 0, 1, Outcome.OK), ("z", 0, 2, Outcome.FAILED),
        ("none", 1, 2, Outcome.OK), ("x", 1, 2, Outcome.OK), ("none", 2, 1, Outcome.OK),
    ]  # fmt: skip
    for accelerator, slot, at_once, outcome in runs:
        tags = {"gpu_slot": str(slot), "concurrent_jobs": str(at_once)}
        run_id = tracker.start_job(f"{slot}/{accelerator}", {"accelerator": accelerator}, sweep_id, tags)
        tracker.end_job(run_id, outcome)
    records = tracker.records(f"tags.sweep_id = '{sweep_id}'")
    assert {record.gpu_slot for record in records} == {0, 1, 2}
    assert last_concurrency(records) == {0: 1, 1: 2}  # slot 2 ran its baseline only; the failed run does not count


def test_a_sweep_measures_its_baseline_again_after_the_accelerated_run(cli, test_accelerators: str) -> None:
    args = ("-m", "accelerator=none,same", "res=64", "runs=2", test_accelerators)
    sweep = cli(*args, "rebaseline=always")
    assert sweep.code == 0, sweep.output
    runs = sweep.runs()
    assert set(runs) == {"tiny/t2i/64/none", "tiny/t2i/64/same", "tiny/t2i/64/none again"}
    first, same, again = (runs[f"tiny/t2i/64/{name}"] for name in ("none", "same", "none again"))
    assert again.data.tags["baseline_again"] == first.info.run_id and "baseline_again" not in first.data.tags
    assert again.data.tags["config_hash"] == first.data.tags["config_hash"]  # the same job, measured twice
    assert first.info.end_time <= same.info.start_time and same.info.end_time <= again.info.start_time
    assert same.data.tags["baseline_run"] == again.info.run_id  # the newest of the sweep's, judged beside the first
    assert "tiny/t2i/64/none again" in sweep.output.split("Sweep ")[-1]  # in the sweep's table
    client = MlflowClient(sweep.tracking_uri)
    report = Path(client.download_artifacts(same.data.tags["sweep_id"], "report/report.md")).read_text()
    # the newest run of the baseline; tagged best where the accelerated run is no faster and it timed steadily
    assert re.search(r"\| none \(baseline, measured again after the others\)( \*\*best\*\*)? \|", report), report

    sweep = cli(*args, "force=true")  # rebaseline=auto: on the CPU there is no GPU busy share to go by
    assert sweep.code == 0, sweep.output
    assert "[tiny/t2i/64/none] not measured again: its first run's GPU busy share was not read" in sweep.output
    jobs = client.search_runs([first.info.experiment_id], "tags.kind = 'job'")
    assert len(jobs) == 5 and sum("baseline_again" in run.data.tags for run in jobs) == 1  # none and same again


def test_a_resumed_sweep_measures_a_baseline_done_on_another_machine_start(cli, test_accelerators: str) -> None:
    """The sweep stopped after its baseline; resumed on another machine start (here: its run's tag changed), the
    accelerated run is measured there and could not be compared with the baseline done before: the baseline is
    measured again after it, where it runs."""
    first = cli("-m", "accelerator=none", "res=64", "runs=2", test_accelerators)
    assert first.code == 0, first.output
    earlier = first.runs()["tiny/t2i/64/none"].info.run_id
    client = MlflowClient(first.tracking_uri)
    client.set_tag(earlier, "boot_id", "an-earlier-start")
    args = ("-m", "accelerator=none,same", "res=64", "runs=2", "rebaseline=never", test_accelerators)
    resumed = cli(*args)
    assert resumed.code == 0, resumed.output
    assert f"[tiny/t2i/64/none] DONE already as run {earlier}" in resumed.output
    assert f"[tiny/t2i/64/none] measured now: its run {earlier} was on another machine start" in resumed.output
    runs = client.search_runs([client.get_run(earlier).info.experiment_id], "tags.kind = 'job'")
    [now] = [
        r
        for r in runs
        if r.data.tags["sweep_id"] != first.runs()["tiny/t2i/64/none"].data.tags["sweep_id"]
        and r.data.params["accelerator"] == "none"
    ]
    assert now.info.run_name == "tiny/t2i/64/none" and "baseline_again" not in now.data.tags
    same = next(r for r in runs if r.data.params["accelerator"] == "same")
    assert same.data.tags["baseline_run"] == now.info.run_id and same.data.tags["pace"] != "no baseline"
    again = cli(*args)  # everything done on this start: nothing measured
    assert again.code == 0 and "measured now" not in again.output, again.output
    assert len(client.search_runs([now.info.experiment_id], "tags.kind = 'job'")) == 3


def test_a_job_that_cannot_run_fails_once_not_again_in_its_baseline_s_second_slot(cli, test_accelerators) -> None:
    sweep = cli("-m", "accelerator=none,same", "res=64", "runs=1", "dtype=fp8", test_accelerators)
    assert sweep.code != 0
    runs = MlflowClient(sweep.tracking_uri).search_runs(["1"], "tags.kind = 'job'")
    assert sorted(run.info.run_name for run in runs) == ["tiny/t2i/64-fp8/none", "tiny/t2i/64-fp8/same"]
    assert all(run.data.tags["error"] == "dtype=fp8: choose one of auto, fp16, bf16, fp32" for run in runs)


def test_image_to_image_starts_from_the_first_baseline_not_its_second(cli, test_accelerators: str) -> None:
    """Here the text-to-image baseline is measured again between the two image-to-image runs."""
    sweep = cli(
        "-m",
        "accelerator=none,same",
        "task=t2i,i2i",
        "task.image=t2i",
        "res=64",
        "runs=2",
        "rebaseline=always",
        test_accelerators,
    )
    assert sweep.code == 0, sweep.output
    runs = sweep.runs()
    first = runs["tiny/t2i/64/none"].info.run_id
    assert "baseline_again" in runs["tiny/t2i/64/none again"].data.tags
    for name in ("tiny/i2i/64/none", "tiny/i2i/64/same"):
        assert runs[name].data.tags["input_image"].startswith(f"run {first} "), name


def test_a_worker_that_dies_is_recorded_as_failed(cli, test_accelerators: str) -> None:
    """A worker killed outright (as the out-of-memory killer would) still leaves a FAILED run, not a RUNNING one."""
    sweep = cli("-m", "accelerator=none,crash", "res=64", "runs=1", test_accelerators)
    assert sweep.code != 0
    runs = sweep.runs()
    assert runs["tiny/t2i/64/none"].data.tags["outcome"] == "ok"
    crashed = runs["tiny/t2i/64/crash"]
    assert crashed.info.status == "FAILED" and "killed by SIGKILL" in crashed.data.tags["error"]


def test_a_worker_that_segfaults_leaves_its_python_stack_in_worker_log(cli, test_accelerators: str) -> None:
    sweep = cli("accelerator=segfault", "res=64", "runs=1", test_accelerators)
    assert sweep.code != 0
    [run] = sweep.runs().values()
    assert "killed by SIGSEGV" in run.data.tags["error"]
    log = Path(MlflowClient(sweep.tracking_uri).download_artifacts(run.info.run_id, "worker.log")).read_text()
    assert "Fatal Python error: Segmentation fault" in log and "fake_accelerators.py" in log


def test_no_secret_or_environment_reaches_mlflow(cli) -> None:
    canary = "hf_canary_s3cret_value"
    sweep = cli("res=64", "runs=1", env={"HF_TOKEN": canary, "MLFLOW_TRACKING_TOKEN": canary})
    assert sweep.code == 0, sweep.output
    [run] = sweep.runs().values()
    client = MlflowClient(sweep.tracking_uri)
    logged = [*run.data.params.values(), *run.data.tags.values()]
    for artifact in ("config.yaml", "worker.log"):
        logged.append(Path(client.download_artifacts(run.info.run_id, artifact)).read_text())
    assert not any(canary in text for text in logged)


@pytest.mark.gpu
def test_tiny_job_on_cuda_records_cuda_memory_and_the_gpu(cli) -> None:
    sweep = cli("device=cuda", "res=64", "runs=2")
    assert sweep.code == 0, sweep.output
    [run] = sweep.runs().values()
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert (params["device"], params["dtype"]) == ("cuda", "fp16")
    assert 0 < metrics["peak_mem_gib"] <= metrics["peak_reserved_gib"] and "peak_rss_gib" not in metrics
    assert tags["device_type"] == "cuda" and tags["gpu_uuid"].startswith("GPU-") and tags["cuda_version"] != "None"
    assert tags["driver_version"] != "unknown" and tags["pinned_cpu"] != "none"


def test_a_job_s_time_line_adds_up_to_its_wall_time() -> None:
    metrics = {"job_wall_s": 40.0, "overhead_s": 8.0, "load_s": 1.0, "warmup_s": 6.0, "time_queued_s": 5.0}
    metrics.update(time_start_s=0.1, time_setup_s=1.5, time_quality_s=0.4, time_timed_s=20.3, time_images_s=0.01)
    line = time_summary(metrics)
    assert line.startswith("wall 40.0 s: loading 1.0, warmup 6.0, timed calls 20.0, waiting for a GPU 5.0; ")
    assert line.endswith("the runner's own 8.0 s (setup 1.5, quality 0.4, start 0.1)")
    metrics.update(accelerate_s=4.0, overhead_s=4.0)  # float8's calibration: the accelerator's, not the runner's
    assert time_summary(metrics).startswith("wall 40.0 s: loading 1.0, applying the accelerator 4.0, warmup 6.0, ")


def test_the_sweep_s_and_the_job_s_processes_leave_torch_to_the_workers() -> None:
    """The workers' server imports torch, diffusers and the rest while the sweep's process starts up (about
    18 s on our H100 hosts); the sweep's process importing them itself would put that before the first job
    again, and a SLURM or local_gpus job's process would pay it twice."""
    entry_points = "import hydra_plugins.runner_sweeper, runner.__main__, runner.job, runner.sweep, runner.launch"
    check = f"{entry_points}; import sys; print(sorted(set(sys.modules) & {{'torch', 'diffusers', 'transformers'}}))"
    imported = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_the_entry_point_starts_the_workers_server_before_it_imports_mlflow_or_torch() -> None:
    """The server's imports are what a sweep's first job waits for; each second the entry point spends before
    starting it (Hydra's composition, MLflow's import: 2 s on this machine) is a second more of that wait."""
    check = (
        "import sys, runner.__main__ as entry\n"
        "def started():\n"
        "    print(sorted(set(sys.modules) & {'mlflow', 'torch', 'runner.job'}))\n"
        "    raise SystemExit(0)\n"
        "entry.start_server = started\n"
        "sys.argv = ['runner', '-m', 'res=64,128']\n"
        "entry.main()\n"
    )
    started = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert started.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("arguments", "here"),
    [
        (["-m", "model=tiny_sdxl", "res=64,128"], True),
        (["hydra/launcher=basic"], True),
        (["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"], False),
        (["-m", "hydra/launcher=local_gpus"], False),
        (["--help"], False),
        (["--cfg", "job"], False),
        (["--cfg=job"], False),
    ],
)
def test_the_entry_point_tells_from_the_command_whether_the_jobs_run_in_its_process(arguments, here) -> None:
    from runner.__main__ import jobs_run_here

    assert jobs_run_here(arguments) is here


def test_a_server_started_for_nothing_is_stopped_at_once_though_its_imports_are_under_way(tmp_path) -> None:
    """A launcher chosen in a config file shows only once the sweep is composed; the server the entry point
    started then is stopped before its imports end (they take 13-21 s on our GPU hosts), not left holding
    torch in memory on a SLURM login node for the whole sweep. Here its import never ends: asking it to stop
    and waiting, as multiprocessing does, would wait for ever."""
    # An import that ends only when the process that started the server does (so a failing run leaves no orphan).
    (tmp_path / "never_imported.py").write_text(
        "import os, time\nparent = os.getppid()\nwhile os.getppid() == parent:\n    time.sleep(0.1)\n"
    )
    check = (
        "import os, sys\n"
        "from multiprocessing import forkserver\n"
        "from runner.launch import WORKERS, start_server, stop_server\n"
        "WORKERS.set_forkserver_preload(['never_imported'])\n"
        "start_server()\n"
        "pid = forkserver._forkserver._forkserver_pid\n"
        "stop_server()\n"
        "try:\n"
        "    os.kill(pid, 0)\n"
        "    print('running')\n"
        "except ProcessLookupError:\n"
        "    print('gone')\n"
        "stop_server()\n"  # none left: nothing to do
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    stopped = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120)
    assert (stopped.returncode, stopped.stdout.strip()) == (0, "gone"), stopped.stderr


def test_a_worker_opens_the_tracking_database_without_importing_its_store(tmp_path) -> None:
    """MLflow imports its database store (SQLAlchemy, its models) only when a store is opened: 0.6-1.1 s of
    every worker's setup on our GPU hosts, unless the workers' server imported it once for all of them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opening = (
        "from runner.config import MlflowConfig\nfrom runner.tracking import Tracker\n"
        f"Tracker(MlflowConfig(tracking_uri='{uri}'))\n"
    )
    subprocess.run([sys.executable, "-c", opening], capture_output=True, check=True)  # the database, as a sweep made it
    check = (
        "import sys\n"
        "from runner.launch import PRELOADED\n"
        "for module in PRELOADED: __import__(module)\n"
        "before = set(sys.modules)\n"
        f"{opening}"
        "print(sorted(set(sys.modules) - before))\n"
    )
    opened = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    imported = set(ast.literal_eval(opened.stdout.strip().splitlines()[-1]))
    assert not imported & {"mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.orm"}
