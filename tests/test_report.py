"""The report, read back as a user would: answer first, one row per job, self-contained HTML, the failed and
skipped jobs at the end."""

import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from runner import catalogue
from runner.compare import compare_job
from runner.config import CONF, MlflowConfig, compose_job
from runner.html import to_html
from runner.plots import run_label
from runner.record import Measurement, Steadiness
from runner.report import REPORT_IMAGE_PX, Answer, Report, newest
from runner.report import main as report_main
from runner.tracking import Tracker
from tests.test_compare import job


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
    assert {"report/report.md", "report/report.html", "report/plots", "report/images"} <= logged, sweep.output
    assert parent.info.status == "FAILED" and parent.data.tags["jobs_failed"] == "1"  # pix2pix x onediff: skipped
    assert "tiny/t2i/64/onediff" in parent.data.tags["mlflow.note.content"]  # the table, in MLflow's UI

    out = tmp_path / "report"
    assert report_main(["--tracking-uri", sweep.tracking_uri, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (out / image).is_file(), image
    html = (out / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert sources and all(source.startswith("data:image/") for source in sources)  # nothing links outside
    assert (out / "plots" / "speedup.png").is_file() and "<table>" in html

    answer = text.split("## Answer")[1].split("\n## ")[0]
    assert "| same |" in answer and "| onediff | not answered |" in answer
    assert "| none |" not in answer  # the baseline is not an accelerator under test
    same = client.get_run(runs["tiny/t2i/64/same"].info.run_id)
    speedup = runs["tiny/t2i/64/none"].data.metrics["latency_s"] / same.data.metrics["latency_s"]
    assert same.data.metrics["speedup_vs_baseline"] == pytest.approx(speedup)
    pace = same.data.tags["pace"]  # inconclusive, on a busy host, with its reason after it
    assert f"| same | {same.data.metrics['latency_s']:.3f} | {speedup:.2f}× | {pace}" in answer

    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections[-1] == "Failed, stopped and skipped jobs"  # at the end, after every measured job
    assert not any("tiny_pix2pix" in section for section in sections)  # no section of its own
    not_run = text.split("## Failed, stopped and skipped jobs")[1]
    assert "| tp2p/t2i/64/none | skipped | model tiny_pix2pix has no t2i pipeline" in not_run
    assert "| tiny/t2i/64/onediff | failed | accelerator=onediff: onediffx is not installed" in not_run


def test_a_later_baseline_judges_the_earlier_run(cli, test_accelerators: str) -> None:
    early = cli("accelerator=same", "res=64", "runs=2", test_accelerators)
    assert early.code == 0, early.output
    assert cli("accelerator=none", "res=64", "runs=2").code == 0  # its sweep compares the whole job
    run = early.runs()["tiny/t2i/64/same"]
    assert run.data.tags["quality_unaffected"] == "true" and run.data.metrics["ssim_vs_baseline"] == pytest.approx(1)
    assert run.data.tags["quality_judged"] == "later, when its baseline was found"
    assert "speedup_vs_baseline" in run.data.metrics and run.data.tags["baseline_why"]


def test_reruns_are_one_job_in_the_answer(cli, tmp_path: Path) -> None:
    """The same job run three times (force) is one row: the newest; the report says the others exist."""
    assert cli("res=64", "runs=2").code == 0
    assert cli("res=64", "runs=2", "force=true").code == 0
    third = cli("res=64", "runs=2", "force=true")
    tracker = Tracker(MlflowConfig(tracking_uri=third.tracking_uri))
    records = tracker.records()
    assert len(records) == 3 and newest(records) == [records[-1]]
    assert report_main(["--tracking-uri", third.tracking_uri, "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "1 job(s): 1 finished" in text and "(2 older run(s) of the same jobs not shown)" in text
    assert text.count("| none (baseline)") == 1


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


def test_an_answer_says_on_how_many_jobs_it_rests() -> None:
    def answer(judged: int, both: int) -> Answer:
        counts = dict(faster=both, unaffected=8, both=both, judged=judged, inconclusive=8 - judged, uncompared=0)
        return Answer("compile_graph", jobs=8, failed=0, speedups=(2.1,) * judged, **counts)

    assert answer(judged=8, both=8).cell == "**Yes**"
    assert answer(judged=2, both=2).cell == "**Yes** (2 of 8 judged)"
    assert answer(judged=2, both=1).cell == "**Partly** (2 of 8 judged)"
    assert answer(judged=0, both=0).cell == "not answered"
    stopped = Answer("torch_compile", 0, 0, 0, 0, 0, 0, 0, failed=0, speedups=(), stopped=1)
    assert stopped.line() == "torch_compile: not answered (0 inconclusive, 0 not compared, 0 failed, 1 stopped)"


def test_a_withheld_verdict_says_whose_timings_forbade_it(tmp_path: Path) -> None:
    """The H100 grid's case: a steady compiled run, 2.38x against an eager baseline whose calls spread 16%,
    is inconclusive, and the tables say it was the baseline, not the run."""

    class NoImages:
        experiment_name = "diffusion-bench"

        def __init__(self, *elsewhere) -> None:
            self.elsewhere = {run.run_id: run for run in elsewhere}  # runs in MLflow that the report was not given

        def download(self, run_id: str, artifact: str) -> None:
            return None

        def kept_record(self, run_id: str):
            return self.elsewhere.get(run_id)  # None: purged from MLflow

    def tables(*runs, shown: int | None = None) -> str:
        """The report of ``runs`` (their first ``shown``: the others are in MLflow only)."""
        judged = compare_job(list(runs))
        records = [replace(run, comparison=judged[run.run_id]) for run in runs]
        given = records[:shown]
        return Report(NoImages(*records[len(given) :]), given, given, tmp_path, []).markdown()

    noisy = Measurement(Steadiness.NOISY, "the calls' spread is 16.0% of their mean (over 15%)")
    base = job("none", 2.312, 0.370, measurement=noisy)
    text = tables(base, job("compile_graph", 0.973, 0.008), job("deepcache", 0.121, 0.026, measurement=noisy))
    assert "| compile_graph | 0.973 | 2.38× | inconclusive (baseline noisy) | true | steady |" in text
    assert "| deepcache | 0.121 | 19.11× | inconclusive (this run noisy, baseline noisy) |" in text
    section = text.split("## Text-to-image")[1]
    assert "| inconclusive (baseline noisy) | true | steady |" in section  # the job's own table too
    quiet, busy = job("none", 2.043, 0.05, sweep="s1"), job("none", 2.830, 0.05, sweep="s2")
    text = tables(quiet, busy, job("compile_graph", 1.122, 0.004, sweep="s3"))
    assert "| 2.52× | inconclusive (baselines disagree) |" in text
    bound, graphed = job("none", 2.749, 0.03), job("cuda_graph", 0.580, 0.002)  # an H200 start, 512 px
    bound.metrics["gpu_busy_share"], graphed.metrics["gpu_busy_share"] = 0.21, 0.90
    text = tables(bound, graphed)
    assert "| 2.749 ± 0.030 | 21% |" in text and "| 0.580 ± 0.002 | 90% |" in text  # the GPU busy column
    assert (
        "none is the baseline (2.749 s; measurement steady; the GPU busy 21% of it: bound by the host, so speedups "
        "over it move with the host's CPU). cuda_graph: 4.74× faster, quality" in text
    )
    bound.metrics["launch_core_loop_ms"], graphed.metrics["launch_core_loop_ms"] = 1.94, 1.32  # another start's
    assert (
        "cuda_graph: 4.74× faster (the baseline's launching core ran a fixed loop in 1.94 ms, 1.32 ms during this "
        "run: the host's speed moved between them), quality unaffected" in tables(bound, graphed)
    )
    # A sweep of two dtypes: each its own job, named so (the run names say -bf16 where it was set by hand)
    half, brain = ({**base.params, "dtype": name} for name in ("fp16", "bf16"))
    text = tables(replace(job("none", 2.0), params=half), replace(job("none", 2.1), params=brain))
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert (
        "Text-to-image, m, 512x512, fp16 on H100" in sections and "Text-to-image, m, 512x512, bf16 on H100" in sections
    )
    # A sweep resumed on the same start: its report holds the graphed run, its baseline is an earlier sweep's
    bound, graphed = replace(bound, sweep_id="s0"), replace(graphed, sweep_id="s2")
    text = tables(graphed, bound, shown=1)
    assert "cuda_graph: 4.74× faster (the baseline's launching core ran a fixed loop in 1.94 ms" in text
    noisy_before = replace(bound, measurement=noisy, run_id="run-earlier")
    assert "| 4.74× | inconclusive (baseline noisy) |" in tables(graphed, noisy_before, shown=1)
    judged = compare_job([graphed, noisy_before])  # ...and where MLflow no longer holds that baseline: the reason
    gone = Report(NoImages(), [replace(graphed, comparison=judged[graphed.run_id])], [], tmp_path, []).markdown()
    assert "| 4.74× | inconclusive (see MLflow's baseline_why) |" in gone


def test_a_grid_of_noise_pictures_makes_a_report_small_enough_to_commit(tmp_path: Path) -> None:
    """Random weights' pictures are noise, which JPEG barely compresses: the H100 grid's 36 of them made a
    2.4 MB report. Its copies are 384 px (REPORT_IMAGE_PX); the HTML embeds them as small thumbnails."""
    (tmp_path / "images").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (REPORT_IMAGE_PX, REPORT_IMAGE_PX, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "images" / "none.png")
    html = to_html("![none](images/none.png)", "report", tmp_path)
    [data] = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", html)
    assert 36 * len(data) < 1.5e6  # the grid's pictures, with room for its plots under 2 MB


def test_accelerators_metrics_are_named_where_a_kernel_module_cannot_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's table and the report name an accelerator's own metrics from its catalogue; a module needing a
    package this machine lacks (the fused GEGLU's kernels: Triton, absent on CPU machines) is left out, not fatal
    (with an accelerator's metric in the sweep's table, a CPU sweep of torch_compile crashed at its table)."""
    monkeypatch.setitem(sys.modules, "triton", None)  # importing it raises ImportError, as where it is missing
    monkeypatch.delitem(sys.modules, "runner.accelerators.geglu_kernels", raising=False)
    catalogue.accelerator_metrics.cache_clear()
    try:
        assert catalogue.describe("compile_s").heading.startswith("torch.compile time")
        assert catalogue.describe("compile_cache_files_at_start").heading.startswith("cache files before")
    finally:
        catalogue.accelerator_metrics.cache_clear()


def test_plots_name_the_dtype_where_the_runs_differ_in_it() -> None:
    """A sweep of dtype=fp16,bf16 drew two bars labelled alike, and its throughput lines merged into one."""
    half, brain = (replace(job("fast", 1.0), params={"dtype": name}) for name in ("fp16", "bf16"))
    assert [run_label(r, [half, brain]) for r in (half, brain)] == [
        "m t2i 512x512 fp16 · fast",
        "m t2i 512x512 bf16 · fast",
    ]
    assert run_label(half, [half]) == "m t2i 512x512 · fast"
