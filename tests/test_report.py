"""Comparing runs (speedup, pace, the best tag) and the report, read back as a user would."""

import re
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from runner.compare import compare, pace
from runner.config import CONF, MlflowConfig, compose_job
from runner.report import main as report_main
from runner.tracking import Tracker


def synthetic(
    tracker: Tracker,
    accelerator: str,
    latency: float,
    std: float,
    *,
    baseline: str = "",
    quality: str = "true",
    device: str = "GPU-A",
    memory: float = 10.0,
) -> str:
    """A finished job run with the metrics and tags compare reads, as a worker would have left it."""
    run_id = tracker.start_run(
        f"m/t2i/512/{accelerator}",
        {"accelerator": accelerator, "runs": 10, "model": "m", "task": "t2i", "height": 512, "width": 512},
        "",
    )
    tracker.log_metrics(run_id, {"latency_s": latency, "latency_std_s": std, "peak_mem_gib": memory})
    tracker.set_tags(
        run_id,
        {"image_key": "k", "device_name": device, "baseline_run": baseline or "self", "quality_unaffected": quality},
    )
    tracker.finish(run_id)
    return run_id


def test_speedup_pace_and_the_best_tag_that_moves(tmp_path: Path) -> None:
    tracker = Tracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="x"))
    base = synthetic(tracker, "none", 2.0, 0.10)
    fast = synthetic(tracker, "fast", 1.0, 0.01, baseline=base, memory=11.0)
    broken = synthetic(tracker, "broken", 0.5, 0.01, baseline=base, quality="false")
    noisy = synthetic(tracker, "noisy", 1.9, 0.50, baseline=base)
    elsewhere = synthetic(tracker, "none", 3.0, 0.10, device="GPU-B")  # another device: its own group
    compare(tracker, tracker.jobs())
    run = {rid: tracker.run(rid) for rid in (base, fast, broken, noisy, elsewhere)}
    assert run[fast].data.metrics["speedup_vs_baseline"] == pytest.approx(2.0)
    assert run[fast].data.metrics["mem_ratio_vs_baseline"] == pytest.approx(1.1)
    assert run[base].data.metrics["speedup_vs_baseline"] == pytest.approx(1.0)
    assert [run[r].data.tags["pace"] for r in (base, fast, broken, noisy)] == [
        "baseline",
        "faster",
        "faster",
        "about as fast",
    ]
    assert [run[r].data.tags["best"] for r in (base, fast, broken, noisy)] == ["false", "true", "false", "false"]
    assert run[elsewhere].data.tags["best"] == "true"  # the only run of its group: its own baseline

    fastest = synthetic(tracker, "fastest", 0.8, 0.01, baseline=base)
    compare(tracker, [tracker.run(fastest)])
    assert tracker.run(fastest).data.tags["best"] == "true" and tracker.run(fast).data.tags["best"] == "false"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # how a user's script finds them
    best = mlflow.search_runs(experiment_names=["x"], filter_string="tags.best = 'true'")
    assert set(best["run_id"]) == {fastest, elsewhere}


def test_noise_is_not_a_speedup(tmp_path: Path) -> None:
    tracker = Tracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="x"))
    base = synthetic(tracker, "none", 1.00, 0.30)
    small = synthetic(tracker, "small", 0.97, 0.001, baseline=base)  # beyond its noise, but under 5%
    lucky = synthetic(tracker, "lucky", 0.80, 0.30, baseline=base)  # 20%, but within 2 standard errors
    assert pace(tracker.run(small), tracker.run(base)) == "about as fast"
    assert pace(tracker.run(lucky), tracker.run(base)) == "about as fast"
    assert pace(tracker.run(base), tracker.run(small)) == "about as fast"


def test_report_of_a_sweep_with_a_skip_and_a_failure(cli, test_accelerators: str, tmp_path: Path) -> None:
    sweep = cli(
        "-m", "model=tiny_sdxl,tiny_pix2pix", "accelerator=none,same,onediff", "res=64", "runs=3", test_accelerators
    )
    assert sweep.code != 0  # onediff cannot run here
    client = MlflowClient(sweep.tracking_uri)
    runs = sweep.runs()
    experiment = client.get_experiment_by_name("diffusion-bench")
    [parent] = client.search_runs([experiment.experiment_id], "tags.kind = 'sweep'")
    for run in runs.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id == run.data.tags["sweep_id"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/plots", "report/images"} <= logged
    assert parent.info.status == "FAILED" and parent.data.tags["jobs_failed"] == "1"  # pix2pix x onediff: skipped

    out = tmp_path / "report"
    assert report_main(["--tracking-uri", sweep.tracking_uri, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (out / image).is_file(), image
    assert (out / "plots" / "latency.png").is_file() and "<table>" in (out / "report.html").read_text()

    none, same = runs["tiny_sdxl/t2i/64/none"], runs["tiny_sdxl/t2i/64/same"]
    speedup = none.data.metrics["latency_s"] / same.data.metrics["latency_s"]
    same_now = client.get_run(same.info.run_id)
    assert same_now.data.metrics["speedup_vs_baseline"] == pytest.approx(speedup)
    # the measured jobs' rows of the per-run tables, by accelerator; which one is best depends on timing noise
    cells = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    rows = {row[0].strip(): row for row in cells if len(row) == 10 and row[1].strip() == "ok"}
    names = {name.removesuffix(" **best**"): name for name in rows}
    assert set(names) == {"none (baseline)", "same"}
    assert rows[names["same"]][8].strip() == f"{speedup:.2f}×"
    best = [name for name in rows if "**best**" in name]
    expected = "same" if same_now.data.tags["pace"] == "faster" else "none (baseline)"
    assert best == [f"{expected} **best**"]
    assert client.get_run(same.info.run_id).data.tags["best"] == ("true" if expected == "same" else "false")

    not_run = text.split("## Failed and skipped jobs")[1]
    assert "| tiny_pix2pix/t2i/64/none | skipped | model tiny_pix2pix has no t2i pipeline" in not_run
    assert "| tiny_sdxl/t2i/64/onediff | failed | accelerator=onediff: onediffx is not installed" in not_run
    assert "**onediff: not answered**" in text and "onediff failed: accelerator=onediff" in text


def test_a_baseline_run_later_still_judges_the_earlier_run(cli, test_accelerators: str, tmp_path: Path) -> None:
    early = cli("accelerator=same", "res=64", "runs=2", test_accelerators)
    assert early.code == 0, early.output
    assert cli("accelerator=none", "res=64", "runs=2").code == 0
    assert report_main(["--tracking-uri", early.tracking_uri, "--out", str(tmp_path / "r")]) == 0
    run = early.runs()["tiny_sdxl/t2i/64/same"]
    assert run.data.tags["quality_unaffected"] == "true" and run.data.metrics["ssim_vs_baseline"] == pytest.approx(1)
    assert run.data.tags["quality_judged"] == "later, when its baseline was found"
    assert "speedup_vs_baseline" in run.data.metrics


def test_report_says_when_there_is_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main(["--tracking-uri", f"sqlite:///{tmp_path}/db", "--out", str(tmp_path / "r")]) == 1
    assert "no job runs in experiment 'diffusion-bench': nothing to report" in capsys.readouterr().err


def test_report_names_a_bad_filter_and_the_syntax(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = f"sqlite:///{tmp_path}/db"
    assert report_main(["--tracking-uri", store, "--filter", "params.res = 1024"]) == 2
    error = capsys.readouterr().err
    assert "error: --filter 'params.res = 1024': " in error and "\"params.res = '1024'" in error


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_names_existing_options(experiment: str) -> None:
    cfg = compose_job(f"+experiment={experiment}")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        full = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    for group, values in (full.hydra.sweeper.params or {}).items():
        if (CONF / group).is_dir():
            for value in str(values).split(","):
                assert (CONF / group / f"{value}.yaml").is_file(), f"{experiment}: {group}={value}"
    assert cfg.names.model
