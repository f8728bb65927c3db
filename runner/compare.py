"""Comparing runs: speedup and memory against the baseline, late quality verdicts, and the best run.

Runs compare when they are the same job on the same kind of device: the same ``image_key`` (everything that
decides the images except the accelerator) and the same ``device_name``. Within such a group:

- the baseline is the run that its accelerated runs were judged against (their ``baseline_run`` tag), or
  else the group's newest baseline run (``baseline_run=self``, accelerator=none);
- every finished run gets ``speedup_vs_baseline`` (the baseline's mean latency over its own) and
  ``mem_ratio_vs_baseline`` (its peak memory over the baseline's, OneFlow's own memory added where logged),
  and the tag ``pace``: ``faster``, ``slower`` or ``about as fast`` (see ``pace``: noise is not a speedup);
- a run that found no baseline when it ran, but has one now (another sweep made it), is judged now, as the
  worker would have (similarity image by image, then the verdict);
- the fastest run whose quality counts as unaffected, among the baseline and the runs faster than it beyond
  noise, gets the tag ``best=true``, the others ``best=false``, so the tag moves when a better run appears.

This runs when a sweep ends and again in ``python -m runner.report``.
"""

import math

from mlflow.entities import Run

from runner.config import QualityConfig
from runner.tracking import Tracker

FASTER = 1.05  # the smallest speedup worth calling one (and slowdown, 1/FASTER), whatever the noise


def memory_gib(run: Run) -> float | None:
    """Peak memory of the timed calls: CUDA allocated (plus OneFlow's own) or the process's RSS on the CPU."""
    metrics = run.data.metrics
    peak = metrics.get("peak_mem_gib", metrics.get("peak_rss_gib"))
    return None if peak is None else peak + metrics.get("oneflow_mem_gib", 0.0)


def compare(tracker: Tracker, runs: list[Run]) -> None:
    """Compare the groups that ``runs`` belong to (whole groups, across sweeps) and tag each group's best."""
    groups = {(r.data.tags["image_key"], r.data.tags.get("device_name", "")) for r in runs if _finished(r)}
    for image_key, device in sorted(groups):
        members = [
            r
            for r in tracker.jobs(f"tags.image_key = '{image_key}' and tags.outcome = 'ok'")
            if r.data.tags.get("device_name", "") == device
        ]
        by_id = {r.info.run_id: r for r in members}
        baselines = [r for r in members if r.data.tags.get("baseline_run") == "self"]
        for run in members:
            baseline = by_id.get(run.data.tags.get("baseline_run", "")) or (baselines[-1] if baselines else None)
            if baseline is None:
                continue
            if run.data.tags.get("quality_unaffected") == "unknown" and run is not baseline:
                _judge_late(tracker, run, baseline)
            _log_ratios(tracker, run, baseline)
        _tag_best([tracker.run(r.info.run_id) for r in members], tracker)


def _finished(run: Run) -> bool:
    return run.data.tags.get("outcome") == "ok" and "image_key" in run.data.tags


def _log_ratios(tracker: Tracker, run: Run, baseline: Run) -> None:
    ratios = {}
    latency, base_latency = run.data.metrics.get("latency_s"), baseline.data.metrics.get("latency_s")
    if latency and base_latency:
        ratios["speedup_vs_baseline"] = base_latency / latency
        tracker.set_tags(run.info.run_id, {"pace": "baseline" if run is baseline else pace(run, baseline)})
    memory, base_memory = memory_gib(run), memory_gib(baseline)
    if memory and base_memory:
        ratios["mem_ratio_vs_baseline"] = memory / base_memory
    tracker.log_metrics(run.info.run_id, ratios)


def pace(run: Run, baseline: Run) -> str:
    """faster, slower, or about as fast: a difference counts only if the mean latencies differ by at least 5%
    and by more than twice the standard error of that difference (from each run's timed calls)."""
    ours, theirs = run.data.metrics, baseline.data.metrics
    error = math.sqrt(
        ours.get("latency_std_s", 0) ** 2 / _calls(run) + theirs.get("latency_std_s", 0) ** 2 / _calls(baseline)
    )
    gained = theirs["latency_s"] - ours["latency_s"]
    speedup = theirs["latency_s"] / ours["latency_s"]
    if abs(gained) <= 2 * error or 1 / FASTER < speedup < FASTER:
        return "about as fast"
    return "faster" if gained > 0 else "slower"


def _calls(run: Run) -> int:
    return max(1, int(run.data.params.get("runs", "1")))


def _judge_late(tracker: Tracker, run: Run, baseline: Run) -> None:
    import torch  # only here: the sweep's own process does not need torch otherwise

    from runner.quality import judge

    params, tags = run.data.params, run.data.tags
    defaults = QualityConfig()
    meaningful = tags.get("clip_score_meaningful") == "true"
    broken = [line for line in tags.get("broken_output", "").split("; ") if line]
    metrics, verdict = judge(
        tracker.download_images(run.info.run_id),
        baseline.info.run_id,
        tracker.download_images(baseline.info.run_id),
        run.data.metrics.get("clip_score") if meaningful else None,
        baseline.data.metrics.get("clip_score") if meaningful else None,
        broken,
        float(params.get("quality.min_ssim", defaults.min_ssim)),
        float(params.get("quality.max_clip_drop_pct", defaults.max_clip_drop_pct)),
        torch.device("cpu"),
    )
    tracker.log_metrics(run.info.run_id, metrics)
    tracker.set_tags(run.info.run_id, {**verdict, "quality_judged": "later, when its baseline was found"})


def _tag_best(members: list[Run], tracker: Tracker) -> None:
    """best=true on the fastest run with quality unaffected, among the baseline and the runs faster than it
    beyond noise (so a run only as fast as the baseline never takes the tag from the simpler baseline)."""
    candidates = [
        r
        for r in members
        if r.data.tags.get("quality_unaffected") == "true" and r.data.tags.get("pace") in ("baseline", "faster")
    ]
    best = min(candidates, key=lambda r: r.data.metrics["latency_s"]) if candidates else None
    for run in members:
        flag = "true" if best is not None and run.info.run_id == best.info.run_id else "false"
        if run.data.tags.get("best") != flag:
            tracker.set_tags(run.info.run_id, {"best": flag})
