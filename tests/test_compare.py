"""Comparisons you can trust: like with like, noise and contention caught, baselines that disagree, the best
tag; on records built in code (the rules) and through a real MLflow store (what a script reads back)."""

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from runner.compare import Again, baseline_again, compare, compare_job, pace
from runner.config import MlflowConfig
from runner.measure import steadiness
from runner.record import (
    Comparison,
    Conditions,
    JobRecord,
    Measurement,
    Outcome,
    Pace,
    Quality,
    QualityResult,
    Steadiness,
    WorkerResult,
)
from runner.sweep import stopped
from runner.tracking import Tracker

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
HERE = Conditions(host="gpu-host", boot_id="boot-1", device_name="H100", gpu_uuid="GPU-a", concurrent_jobs=1)
STEADY = Measurement(Steadiness.STEADY, "CV 1%")
COUNTER = iter(range(1_000_000))


def job(
    accelerator: str,
    latency: float,
    std: float = 0.01,
    *,
    sweep: str = "s1",
    conditions: Conditions = HERE,
    measurement: Measurement = STEADY,
    quality: Quality = Quality.UNAFFECTED,
    memory: float = 10.0,
) -> JobRecord:
    """A finished run of one job (one image_key) as a worker would have left it."""
    number = next(COUNTER)
    return JobRecord(
        run_id=f"run{number:04d}",
        name=f"m/t2i/512/{accelerator}",
        outcome=Outcome.OK,
        why="",
        started_ms=number,
        pid="1",
        slurm_job="",
        sweep_id=sweep,
        config_hash=f"{accelerator}-{sweep}",
        model="m",
        task="t2i",
        task_title="Text-to-image",
        size="512x512",
        batch=1,
        accelerator=accelerator,
        baseline_accelerator="none",
        weights="random",
        model_id="",
        runs=10,
        image_key="k",
        conditions=conditions,
        measurement=measurement,
        quality=QualityResult(quality, "", "self" if accelerator == "none" else ""),
        comparison=None,
        metrics={"latency_s": latency, "latency_std_s": std, "peak_mem_gib": memory},
        params={},
    )


def test_speedup_pace_and_best_against_the_same_sweeps_baseline() -> None:
    base, fast, broken, close = job("none", 2.0, 0.1), job("fast", 1.0, memory=11.0), job("broken", 0.5), job("x", 1.97)
    broken = replace(broken, quality=QualityResult(Quality.AFFECTED, "SSIM 0.5 < 0.95"))
    result = compare_job([base, fast, broken, close])
    assert result[base.run_id] == Comparison(Pace.BASELINE, "this is the baseline", "self", None, None, False)
    assert result[fast.run_id].speedup == pytest.approx(2.0) and result[fast.run_id].mem_ratio == pytest.approx(1.1)
    assert result[fast.run_id].baseline_run == base.run_id and result[fast.run_id].why == "the same sweep's baseline"
    assert [result[r.run_id].pace for r in (fast, broken, close)] == [Pace.FASTER, Pace.FASTER, Pace.SAME]
    assert [r for r in result if result[r].best] == [fast.run_id]  # the fastest one is broken: not best


def test_noise_is_not_a_speedup() -> None:
    base = job("none", 1.00, 0.30)
    small = job("small", 0.97, 0.001)  # beyond its noise, but under 5%
    lucky = job("lucky", 0.80, 0.30)  # 20%, but within 2 standard errors
    assert pace(small, base) is Pace.SAME and pace(lucky, base) is Pace.SAME and pace(base, small) is Pace.SAME


def test_a_baseline_from_another_gpu_machine_start_or_concurrency_is_not_used() -> None:
    run = job("fast", 1.0, sweep="s2")
    elsewhere = [
        job("none", 2.0, conditions=replace(HERE, gpu_uuid="GPU-b")),
        job("none", 3.0, conditions=replace(HERE, boot_id="boot-0")),
        job("none", 2.8, conditions=replace(HERE, concurrent_jobs=2)),
        job("none", 2.5, conditions=replace(HERE, boot_id="")),  # a run from before machine starts were tagged
    ]
    comparison = compare_job([*elsewhere, run])[run.run_id]
    assert comparison.pace is Pace.UNCOMPARED and comparison.speedup is None
    assert comparison.why == (
        "no baseline under the same conditions: the 4 baseline run(s) of this job had 2 job(s) at once, not 1, "
        "another device, another machine start, its machine start is unknown; run accelerator=none beside it "
        "(with force=true: a finished baseline is otherwise not run again)"
    )
    same = job("none", 2.1, sweep="s0")  # same GPU and start, another sweep: used, and said so
    comparison = compare_job([*elsewhere, same, run])[run.run_id]
    assert comparison.baseline_run == same.run_id and comparison.pace is Pace.FASTER
    assert comparison.why.startswith("the newest of 1 baseline(s) on the same device and machine start")


def test_the_same_sweeps_baseline_wins_over_a_newer_one() -> None:
    ours = job("none", 2.0, sweep="s1")
    run = job("fast", 1.0, sweep="s1")
    newer = job("none", 2.02, sweep="s2")
    assert compare_job([ours, run, newer])[run.run_id].baseline_run == ours.run_id


def test_baselines_that_disagree_give_no_verdict() -> None:
    """The issue's 2-GPU host: the same job measured 2.04 s in one sweep and 2.83 s in another."""
    quiet, busy = job("none", 2.043, 0.05, sweep="s1"), job("none", 2.830, 0.05, sweep="s2")
    graphed = job("compile_graph", 1.122, 0.004, sweep="s3")
    result = compare_job([quiet, busy, graphed])
    assert result[graphed.run_id].pace is Pace.INCONCLUSIVE
    assert "the 2 eligible baselines disagree (2.043 s" in result[graphed.run_id].why
    assert result[graphed.run_id].speedup == pytest.approx(2.830 / 1.122)  # measured against the newest, said
    assert "disagrees with 2.830 s" in result[quiet.run_id].why  # and the baselines say so too
    assert result[quiet.run_id].pace is Pace.BASELINE and result[quiet.run_id].speedup is None


def test_a_baseline_measured_again_after_the_run_that_moved_withholds_the_verdict() -> None:
    """An H200 start (BENCHMARKS.md, "A baseline measured again"): eager none 2.535 s (CV 12.2%) before
    cuda_graph's steady 1.426 s, 2.011 s (CV 11.2%) and 2.197 s (CV 10.8%) minutes later."""
    first, graphed = job("none", 2.535, 0.309), job("cuda_graph", 1.426, 0.0114)
    moved = replace(job("none", 2.011, 0.225), again_of=first.run_id)
    result = compare_job([first, graphed, moved])
    assert result[graphed.run_id].pace is Pace.INCONCLUSIVE and result[graphed.run_id].baseline_run == moved.run_id
    assert result[
        graphed.run_id
    ].why.endswith(  # withheld, and how far apart the two leave it
        f"disagree (2.535 s (run {first.run_id[:8]}), 2.011 s (run {moved.run_id[:8]}, measured again)), though "
        "this run is faster than each (1.41×-1.78×)"
    )
    between = job("x", 2.3, 0.2)  # faster than the first, slower than the second: nothing to add
    assert compare_job([first, between, moved])[between.run_id].why.endswith("measured again))")
    first = job("none", 2.011, 0.225)
    held = replace(job("none", 2.197, 0.237), again_of=first.run_id)  # within the noise of the first: a verdict
    result = compare_job([first, graphed, held])
    assert result[graphed.run_id].pace is Pace.FASTER and result[graphed.run_id].baseline_run == held.run_id
    assert result[graphed.run_id].speedup == pytest.approx(2.197 / 1.426)


def test_a_baseline_is_measured_again_where_it_was_bound_by_its_host() -> None:
    start = (HERE.host, HERE.boot_id)

    def first(busy: float | None) -> JobRecord:
        base = job("none", 2.5)
        return base if busy is None else replace(base, metrics={**base.metrics, "gpu_busy_share": busy})

    def again(rebaseline: str, busy: float | None) -> Again:
        base = first(busy)
        return baseline_again(rebaseline, [base], [job("x", 1.0)], "s1", start)

    base = first(0.56)  # eager SDXL on an H200: 56% busy
    assert baseline_again("auto", [base], [job("x", 1.0)], "s1", start) == Again(
        True, f"the baseline again, after the job's accelerated runs (first: run {base.run_id})", base.run_id
    )
    assert again("auto", 0.96) == Again(
        False,
        "its first run kept the GPU busy 96% of its timed calls; rebaseline=always would measure it again",
    )
    assert again("auto", None).why.startswith("its first run's GPU busy share was not read")
    assert again("always", 0.96).again_of and again("always", None).again_of
    assert again("never", 0.56) == Again(False, "rebaseline=never")


def test_a_baseline_is_measured_again_only_after_runs_it_has_not_followed() -> None:
    start = (HERE.host, HERE.boot_id)
    base = job("none", 2.5)
    run = job("x", 1.0)
    # an earlier sweep stopped during the second measurement: resumed, nothing new, still measured again
    assert baseline_again("always", [base], [run], "s2", start).again_of == base.run_id
    second = replace(job("none", 2.4), again_of=base.run_id)
    assert baseline_again("always", [base, second], [run], "s2", start) == Again(
        False, f"none of its job's runs came after its run {second.run_id}"
    )
    later = job("y", 1.2, sweep="s2")  # a new accelerator in a later sweep: measured again after it
    assert baseline_again("always", [base, second], [run, later], "s2", start).again_of == base.run_id
    assert not baseline_again("always", [], [run], "s1", start).measure  # the baseline never ended


def test_runs_count_as_measured_when_they_took_their_gpu_not_when_they_were_opened() -> None:
    """Under local_gpus a job opens its run, then queues for its slot's GPU: CI saw 72 px's accelerated run opened
    first and measured second. Whether a baseline came after its job's runs goes by when each was measured."""
    start = (HERE.host, HERE.boot_id)

    def queued(record: JobRecord, seconds: float) -> JobRecord:
        return replace(record, metrics={**record.metrics, "time_queued_s": seconds})

    base, run = job("none", 2.5), job("x", 1.0)  # opened in this order
    assert queued(base, 10.0).measured_ms == base.started_ms + 10_000
    # the baseline waited for the GPU while the run was measured: it came after the run, nothing to measure again
    assert baseline_again("always", [queued(base, 10.0)], [run], "s1", start) == Again(
        False, f"none of its job's runs came after its run {base.run_id}"
    )
    early_run, late_base = job("x", 1.0), job("none", 2.5)  # the run opened first, then waited for the GPU
    assert baseline_again("always", [late_base], [queued(early_run, 10.0)], "s1", start).again_of == late_base.run_id
    # and the newest of two baselines alike is the one measured last
    first, second = job("none", 2.0), job("none", 2.0)
    compared = compare_job([queued(first, 10.0), second, run])[run.run_id]
    assert compared.baseline_run == first.run_id


def test_a_baseline_done_on_another_machine_start_is_measured_where_the_sweep_runs() -> None:
    start = (HERE.host, HERE.boot_id)
    before = job("none", 2.5, conditions=replace(HERE, boot_id="boot-0"))
    resumed = job("x", 1.0, sweep="s2")  # the sweep resumed on boot-1: its runs need a baseline there
    for rebaseline in ("auto", "always", "never"):
        measured = baseline_again(rebaseline, [before], [resumed], "s2", start)
        assert measured == Again(
            True,
            f"its run {before.run_id} was on another machine start, and this sweep's runs of the job compare only "
            "with a baseline of theirs",
        )
    old = job("x", 1.0, conditions=replace(HERE, boot_id="boot-0"))  # nothing of the job ran on this start
    assert not baseline_again("always", [before], [old], "s2", start).measure
    assert not baseline_again("always", [before], [resumed], "s3", start).measure  # not this sweep's run


def test_a_noisy_or_contended_run_or_baseline_gets_no_verdict() -> None:
    noisy = Measurement(Steadiness.NOISY, "the calls' spread is 96.2% of their mean (over 15%)")
    contended = Measurement(Steadiness.CONTENDED, "2 other process(es) on its GPU")
    base = job("none", 1.7)
    slow = job("deepcache", 8.65, 8.3, measurement=noisy)  # the deepcache run
    result = compare_job([base, slow])[slow.run_id]
    assert result.pace is Pace.INCONCLUSIVE and "this run was noisy: the calls' spread is 96.2%" in result.why
    busy_base, run = job("none", 2.0, measurement=contended), job("fast", 1.0)
    result = compare_job([busy_base, run])
    assert result[run.run_id].pace is Pace.INCONCLUSIVE and "its baseline was contended" in result[run.run_id].why
    assert not any(c.best for c in result.values())  # no steady baseline, no verdict: no best


def test_a_baseline_that_kept_the_gpu_waiting_on_its_host_is_said_to_be_bound_by_the_host() -> None:
    """The H200 start where eager none kept the GPU busy 21% at 512 px and cuda_graph 90%: the verdict stands,
    and its reason says the speedup is the host's as much as the accelerator's."""
    base, graphed = job("none", 2.749, 0.03), job("cuda_graph", 0.580, 0.002)
    base.metrics["gpu_busy_share"], graphed.metrics["gpu_busy_share"] = 0.21, 0.90
    comparison = compare_job([base, graphed])[graphed.run_id]
    assert comparison.pace is Pace.FASTER and comparison.speedup == pytest.approx(2.749 / 0.580)
    assert comparison.why == (
        "the same sweep's baseline; its baseline kept the GPU busy 21% of its timed calls: bound by the host, "
        "so the speedup moves with its CPU"
    )
    base.metrics["launch_core_loop_ms"], graphed.metrics["launch_core_loop_ms"] = 1.94, 1.32  # that start's loops
    assert compare_job([base, graphed])[graphed.run_id].why == (
        "the same sweep's baseline; its baseline kept the GPU busy 21% of its timed calls: bound by the host, "
        "so the speedup moves with its CPU, whose launching core ran a fixed loop in 1.94 ms against 1.32 ms "
        "during this run: the host's speed moved between them"
    )
    graphed.metrics["launch_core_loop_ms"] = 1.80  # within 15%: the host's speed is not said to have moved
    assert compare_job([base, graphed])[graphed.run_id].why.endswith("so the speedup moves with its CPU")
    base.metrics["gpu_busy_share"] = 0.95  # a GPU-bound baseline (or one without the samples): nothing said
    assert compare_job([base, graphed])[graphed.run_id].why == "the same sweep's baseline"
    del base.metrics["gpu_busy_share"]
    assert compare_job([base, graphed])[graphed.run_id].why == "the same sweep's baseline"


def finished_run(tracker: Tracker, folder: Path, accelerator: str, latency: float, sweep_id: str = "") -> str:
    """A steady run of job "k" recorded in a real MLflow store as a worker leaves it; its run id."""
    run_id = tracker.start_job(f"m/t2i/512/{accelerator}", {"accelerator": accelerator, "runs": 10}, sweep_id, {})
    result = WorkerResult(
        metrics={"latency_s": latency, "latency_std_s": 0.01, "peak_mem_gib": 10.0},
        image_key="k",
        conditions=HERE,
        measurement=STEADY,
        quality=QualityResult(Quality.UNAFFECTED, "fine", "self" if accelerator == "none" else "b"),
    )
    tracker.record_result(run_id, result, folder)
    tracker.end_job(run_id, Outcome.OK)
    return run_id


def test_a_verdict_changed_by_a_later_sweep_is_said_atop_the_earlier_sweeps_note(tmp_path: Path) -> None:
    """A later sweep's baseline that disagrees with the first makes the first sweep's "faster" inconclusive: compare
    returns that change, and the first sweep's MLflow note, which still holds the answer it printed, now opens with
    it (seen on an H100 start, 2026-12-06: image-to-image's first sweep printed "faster", the next one's baselines
    disagreed)."""
    tracker = Tracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="x"))

    def finished(accelerator: str, latency: float, sweep_id: str) -> str:
        return finished_run(tracker, tmp_path, accelerator, latency, sweep_id)

    first = tracker.start_sweep("first", "accelerator=none,fast", {})
    finished("none", 2.0, first)
    fast = finished("fast", 1.0, first)
    assert compare(tracker, tracker.records(), first) == []  # judged for the first time: no change
    tracker.end_sweep(first, "FINISHED", {"mlflow.note.content": "**Answer.** fast: Yes, faster"})
    assert tracker.record(fast).comparison.pace is Pace.FASTER

    second = tracker.start_sweep("second", "accelerator=none", {})
    finished("none", 3.0, second)  # the same job on the same start, 50% slower: the baselines disagree
    changed = compare(tracker, tracker.records(f"tags.sweep_id = '{second}'"), second)

    assert [(c.run.run_id, c.was.pace, c.now.pace) for c in changed] == [(fast, Pace.FASTER, Pace.INCONCLUSIVE)]
    assert tracker.record(fast).comparison.pace is Pace.INCONCLUSIVE
    note = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(first).data.tags["mlflow.note.content"]
    heading, change, _, old = note.split("\n")
    assert heading == f"**Verdicts changed since this sweep ended**, by sweep {second}:"
    assert change.startswith(f"- m/t2i/512/fast (run {fast[:8]}): faster -> inconclusive: ")
    assert "baselines disagree" in change
    assert old == "**Answer.** fast: Yes, faster"  # what it printed stays, below
    assert compare(tracker, tracker.records()) == []  # nothing changes again: no second line

    third = tracker.start_sweep("third", "accelerator=fastest", {})
    fastest = finished("fastest", 0.5, third)
    compare(tracker, tracker.records())  # python -m runner.compare judges it before its sweep ends: inconclusive
    slow_baseline = next(r.run_id for r in tracker.records() if r.metrics["latency_s"] == 3.0)
    mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").set_tag(slow_baseline, "outcome", "failed")
    changed = compare(tracker, tracker.records(f"tags.sweep_id = '{third}'"), third)  # the baselines agree again
    assert tracker.record(fastest).comparison.pace is Pace.FASTER  # changed too, but its own sweep's table says so
    assert [(c.run.run_id, c.now.pace) for c in changed] == [(fast, Pace.FASTER)]


def test_a_stopped_sweep_says_the_verdicts_its_ended_jobs_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A sweep stopped (Ctrl-C, a scheduler's SIGTERM) after a job whose baseline disagrees with an earlier sweep's
    prints, below its one line, the earlier run whose verdict that changed, as a finished sweep would."""
    tracker = Tracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="x"))
    first = tracker.start_sweep("first", "accelerator=none,fast", {})
    finished_run(tracker, tmp_path, "none", 2.0, first)
    fast = finished_run(tracker, tmp_path, "fast", 1.0, first)
    compare(tracker, tracker.records(), first)
    second = tracker.start_sweep("second", "accelerator=none,fast", {})
    finished_run(tracker, tmp_path, "none", 3.0, second)  # then stopped, before its "fast"
    with pytest.raises(SystemExit) as ended:
        stopped(tracker, second, KeyboardInterrupt())
    assert ended.value.code == 130
    err = capsys.readouterr().err
    said = err[err.index("Stopped by") :].strip().splitlines()  # after MLflow's own logging
    assert said[0].startswith("Stopped by Ctrl-C: 1 ended job(s) are recorded and compared in sweep")
    assert said[1].startswith("Earlier runs' verdicts changed by this sweep's runs")
    assert said[2].startswith(f"  m/t2i/512/fast (run {fast[:8]}): faster -> inconclusive: ") and len(said) == 3


def test_verdicts_written_and_read_back_through_mlflow(tmp_path: Path) -> None:
    """compare writes its verdicts into the store; the best tag moves when a better run appears."""
    tracker = Tracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="x"))

    def finished(accelerator: str, latency: float) -> str:
        return finished_run(tracker, tmp_path, accelerator, latency)

    base, fast = finished("none", 2.0), finished("fast", 1.0)
    compare(tracker, tracker.records())
    assert tracker.record(fast).comparison.best and not tracker.record(base).comparison.best
    faster = finished("faster", 0.8)
    compare(tracker, [tracker.record(faster)])  # one run's job: the whole job is compared again
    assert tracker.record(faster).comparison.best and not tracker.record(fast).comparison.best
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # how a user's script finds them
    best = mlflow.search_runs(experiment_names=["x"], filter_string="tags.best = 'true'")
    assert list(best["run_id"]) == [faster]
    assert best["tags.pace"][0] == "faster" and best["metrics.speedup_vs_baseline"][0] == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("results", "faster", "inconclusive"),
    [("2026-11-26-h100-original-full", 7, 13), ("2026-11-26-h200x2", 1, 5)],
)
def test_the_published_verdicts_follow_from_the_rules(results: str, faster: int, inconclusive: int) -> None:
    """BENCHMARKS.md's grid on the H100 and parallel check on two H200s, re-judged from their raw export:
    each run's measurement from its own calls, each comparison from the runs of its job. If a rule changes,
    this says which published verdicts it changes (recheck BENCHMARKS.md, then update these counts)."""
    exported = json.loads((RESULTS / results / "runs.json").read_text())
    jobs: dict[str, list[JobRecord]] = defaultdict(list)
    for run in exported:
        info = SimpleNamespace(
            run_id=run["run_id"], run_name=run["name"], status=run["status"], start_time=run["start_time_ms"]
        )
        record = JobRecord.from_run(
            SimpleNamespace(
                info=info, data=SimpleNamespace(**{part: run[part] for part in ("params", "tags", "metrics")})
            )
        )
        if record.ok:
            assert steadiness(run["series"]["call_latency_s"]).steadiness is record.measurement.steadiness, run["name"]
            jobs[record.image_key].append(record)
    paces = Counter()
    for members in jobs.values():
        for run_id, comparison in compare_job(members).items():
            published = next(m for m in members if m.run_id == run_id).comparison
            assert (comparison.pace, comparison.best) == (published.pace, published.best), run_id
            paces[comparison.pace] += 1
    assert (paces[Pace.FASTER], paces[Pace.INCONCLUSIVE], paces[Pace.SLOWER]) == (faster, inconclusive, 0)
