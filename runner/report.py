"""The report: Markdown and HTML in the shape of the original hand-written one, every row filled from MLflow.

    python -m runner.report [--experiment NAME] [--tracking-uri URI] [--out DIR] [--filter MLFLOW_FILTER]

Per task, model, size and device: each accelerator's warmup, inference time, it/s, peak memory, CLIP score,
SSIM to the baseline and speedup, the images side by side, and a conclusion in plain words; failed and
skipped jobs are named where they belong and again at the end. It first compares the runs (runner/compare.py),
so runs from separate sweeps compare. A sweep writes one for its own runs when it ends, into its MLflow run.
"""

import argparse
import shutil
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import markdown
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from runner.compare import FASTER, compare, memory_gib
from runner.config import MlflowConfig
from runner.plots import plot_runs
from runner.tracking import Tracker

Block = tuple[str, str, str, str]  # task, model, size, device name


def write_report(tracker: Tracker, out: Path, runs: list[Run]) -> list[Run]:
    """Compare ``runs``, then write ``report.md``, ``report.html``, their images and plots to ``out``; return
    the runs as they stand after the comparison."""
    compare(tracker, runs)
    runs = [tracker.run(run.info.run_id) for run in runs]
    (out / "images").mkdir(parents=True, exist_ok=True)
    plots = plot_runs(_finished(runs), out / "plots")
    text = Report(tracker, runs, out, plots).markdown()
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_html(text, f"Report: {tracker.experiment_name}"))
    return runs


class Report:
    def __init__(self, tracker: Tracker, runs: list[Run], out: Path, plots: list[Path]) -> None:
        self.tracker, self.runs, self.out, self.plots = tracker, runs, out, plots
        self.blocks: dict[Block, list[Run]] = defaultdict(list)
        for run in runs:
            p = run.data.params
            size = f"{p.get('height', '?')}x{p.get('width', '?')}"
            self.blocks[(p.get("task", "?"), p.get("model", "?"), size, run.data.tags.get("device_name", ""))].append(
                run
            )

    def markdown(self) -> str:
        lines = [
            "# Does acceleration make the pipelines faster, with quality unaffected?",
            "",
            f"Experiment `{self.tracker.experiment_name}`: {self._counts()}. Written "
            f"{datetime.now():%Y-%m-%d %H:%M} by `python -m runner.report`; every number comes from the runs in "
            "MLflow, measured as README.md (Measurement protocol) describes.",
            "",
            "## Answer",
            "",
            *self._answer(),
            "",
            *(f"![{plot.stem}](plots/{plot.name})" for plot in self.plots),
            "",
        ]
        for task in self._tasks():
            title = next(r.data.params.get("task_title", task) for r in self.runs if r.data.params.get("task") == task)
            lines += [f"## {title} (`{task}`)", ""]
            for model in sorted({block[1] for block in self.blocks if block[0] == task}):
                lines += self._model(task, model)
        lines += self._not_run()
        return "\n".join(lines) + "\n"

    # Sections

    def _counts(self) -> str:
        outcomes = [run.data.tags.get("outcome", "?") for run in self.runs]
        devices = sorted({run.data.tags.get("device_name", "") for run in self.runs} - {""})
        return (
            f"{len(self.runs)} job(s): {outcomes.count('ok')} finished, {outcomes.count('failed')} failed, "
            f"{outcomes.count('skipped')} skipped; on {', '.join(devices) or 'no device'}"
        )

    def _answer(self) -> list[str]:
        per_accelerator: dict[str, list[Run]] = defaultdict(list)
        failed: dict[str, int] = defaultdict(int)
        for run in self.runs:
            accelerator = run.data.params.get("accelerator", "?")
            if run.data.tags.get("outcome") == "failed":
                failed[accelerator] += 1
            elif _compared(run) and run.data.tags.get("baseline_run") != "self":
                per_accelerator[accelerator].append(run)
        if not per_accelerator:
            lines = [
                "No accelerated run has a baseline to compare with yet: sweep `accelerator=none,<other>` "
                "(the baseline first) to answer the question."
            ]
        else:
            lines = [
                "| accelerator | compared jobs | faster | quality unaffected | faster and unaffected | speedup "
                "| failed jobs |",
                "|---|---:|---:|---:|---:|---|---:|",
            ]
            sentences = []
            for accelerator, runs in sorted(per_accelerator.items()):
                speedups = [r.data.metrics["speedup_vs_baseline"] for r in runs]
                fast = [r for r in runs if r.data.tags.get("pace") == "faster"]
                good = [r for r in runs if r.data.tags.get("quality_unaffected") == "true"]
                both = [r for r in fast if r in good]
                lines.append(
                    f"| {accelerator} | {len(runs)} | {len(fast)} | {len(good)} | {len(both)} | "
                    f"{min(speedups):.2f}×-{max(speedups):.2f}× | {failed.pop(accelerator, 0)} |"
                )
                verdict = "Yes" if len(both) == len(runs) else "Partly" if both else "No"
                sentences.append(
                    f"- **{accelerator}: {verdict}.** Faster (by {FASTER:.2f}× or more, beyond noise) in "
                    f"{len(fast)} of {len(runs)} compared job(s), {min(speedups):.2f}× to {max(speedups):.2f}×; "
                    f"quality unaffected in {len(good)} of {len(runs)}."
                )
            for accelerator, count in sorted(failed.items()):
                sentences.append(f"- **{accelerator}: not answered**: its {count} job(s) failed (see below).")
            lines += ["", *sentences]
        if any(run.data.params.get("weights") == "random" for run in self.runs):
            lines += [
                "",
                "Runs with `weights=random` time exactly like the real models, but their images are "
                "noise: their CLIP scores mean nothing, so their quality is judged by similarity to the "
                "baseline alone.",
            ]
        return lines

    def _model(self, task: str, model: str) -> list[str]:
        blocks = sorted((b for b in self.blocks if b[0] == task and b[1] == model), key=lambda b: _pixels(b[2]))
        first = self.blocks[blocks[0]][0].data.params
        source = f"`{first['model_id']}`" if first.get("model_id", "null") != "null" else "built in code"
        lines = [f"### {model} ({source}, {first.get('weights', '?')} weights)", ""]
        for block in blocks:
            runs = sorted(self.blocks[block], key=_order)
            lines += [f"#### {block[2]}" + (f" on {block[3]}" if block[3] else ""), ""]
            lines += [*self._table(runs), "", *self._images(runs), "", *self._conclusion(runs), ""]
        return lines

    def _table(self, runs: list[Run]) -> list[str]:
        lines = [
            "| accelerator | outcome | warmup (s) | inference time (s) | it/s | peak memory (GiB) | CLIP score "
            "| SSIM vs baseline | speedup | quality unaffected |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for run in runs:
            m, tags = run.data.metrics, run.data.tags
            name = run.data.params.get("accelerator", "?")
            name += " (baseline)" if tags.get("baseline_run") == "self" else ""
            name += " **best**" if tags.get("best") == "true" else ""
            if tags.get("outcome") != "ok":
                lines.append(f"| {name} | {tags.get('outcome', '?')} | | | | | | | | |")
                continue
            clip = f"{m['clip_score']:.2f}" + ("" if tags.get("clip_score_meaningful") == "true" else " (meaningless)")
            memory = memory_gib(run)
            lines.append(
                f"| {name} | ok | {m['warmup_s']:.2f} | {m['latency_s']:.3f} ± {m.get('latency_std_s', 0):.3f} | "
                f"{m['its']:.2f} | {f'{memory:.2f}' if memory is not None else '-'} | {clip} | "
                f"{_number(m.get('ssim_vs_baseline'), '.4f')} | {_number(m.get('speedup_vs_baseline'), '.2f', '×')} | "
                f"{tags.get('quality_unaffected', '?')} |"
            )
        return lines

    def _images(self, runs: list[Run]) -> list[str]:
        shown = [(run, self._copy_image(run)) for run in runs if run.data.tags.get("outcome") == "ok"]
        shown = [(run, path) for run, path in shown if path]
        if not shown:
            return ["(no images logged)"]
        columns = (
            [("input", self._copy_image(shown[0][0], "input.png"))]
            if self._copy_image(shown[0][0], "input.png")
            else []
        )
        columns += [(run.data.params.get("accelerator", "?"), path) for run, path in shown]
        return [
            "| " + " | ".join(name for name, _ in columns) + " |",
            "|" + "---|" * len(columns),
            "| " + " | ".join(f"![{name}]({path})" for name, path in columns) + " |",
        ]

    def _copy_image(self, run: Run, artifact: str = "") -> str:
        """Copy the run's first image (or ``artifact``) next to the report; return its relative path or ""."""
        run_id = run.info.run_id
        if not artifact:
            names = sorted(a.path for a in self.tracker.client.list_artifacts(run_id, "images"))
            if not names:
                return ""
            artifact = names[0]
        elif artifact not in {a.path for a in self.tracker.client.list_artifacts(run_id)}:
            return ""
        target = self.out / "images" / f"{run_id[:12]}-{Path(artifact).name}"
        if not target.exists():
            shutil.copy(self.tracker.client.download_artifacts(run_id, artifact), target)
        return f"images/{target.name}"

    def _conclusion(self, runs: list[Run]) -> list[str]:
        sentences = []
        baselines = [r for r in runs if r.data.tags.get("baseline_run") == "self"]
        for run in runs:
            accelerator, tags = run.data.params.get("accelerator", "?"), run.data.tags
            if tags.get("outcome") == "failed":
                sentences.append(f"{accelerator} failed: {tags.get('error', '?')}")
            elif tags.get("outcome") == "skipped":
                sentences.append(f"{accelerator} was skipped: {tags.get('skip_reason', '?')}")
            elif run not in baselines:
                sentences.append(_plain(accelerator, run))
        best = [r for r in runs if r.data.tags.get("best") == "true"]
        if best and best[0] not in baselines:
            speedup = best[0].data.metrics.get("speedup_vs_baseline", 1)
            sentences.append(
                f"Best with quality unaffected: {best[0].data.params.get('accelerator')} ({speedup:.2f}×)."
            )
        elif any(r not in baselines and r.data.tags.get("outcome") == "ok" for r in runs):
            sentences.append("No accelerator beat plain diffusers with quality unaffected here.")
        if not baselines:
            sentences.append("(Its baseline, accelerator=none, is in another sweep or missing.)")
        return ["**Conclusion.** " + " ".join(sentences)] if sentences else []

    def _not_run(self) -> list[str]:
        missing = [run for run in self.runs if run.data.tags.get("outcome") in ("failed", "skipped")]
        if not missing:
            return ["## Failed and skipped jobs", "", "None: every job finished.", ""]
        lines = ["## Failed and skipped jobs", "", "| job | outcome | why |", "|---|---|---|"]
        for run in missing:
            tags = run.data.tags
            why = (tags.get("error") or tags.get("skip_reason") or "?").replace("|", "/")
            lines.append(f"| {run.info.run_name} | {tags['outcome']} | {why} |")
        return [*lines, ""]

    def _tasks(self) -> list[str]:
        return list(dict.fromkeys(block[0] for block in sorted(self.blocks, key=lambda b: (b[0] != "t2i", b[0]))))


def _plain(accelerator: str, run: Run) -> str:
    speedup = run.data.metrics.get("speedup_vs_baseline")
    verdict, why = run.data.tags.get("quality_unaffected"), run.data.tags.get("quality_verdict", "")
    if speedup is None:
        return f"{accelerator}: not compared (no baseline)."
    pace = run.data.tags.get("pace")
    pace = (
        f"{speedup:.2f}× faster"
        if pace == "faster"
        else f"{1 / speedup:.2f}× slower"
        if pace == "slower"
        else f"about as fast ({speedup:.2f}×, within the calls' noise or under {FASTER:.2f}×)"
    )
    quality = {"true": "quality unaffected", "false": "quality affected"}.get(verdict, "quality not compared")
    return f"{accelerator}: {pace}, {quality} ({why})."


def _compared(run: Run) -> bool:
    return "speedup_vs_baseline" in run.data.metrics


def _finished(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.data.tags.get("outcome") == "ok"]


def _order(run: Run) -> tuple:
    """Baseline first, then finished runs fastest first, then the failed and skipped."""
    tags = run.data.tags
    return (tags.get("baseline_run") != "self", tags.get("outcome") != "ok", run.data.metrics.get("latency_s", 0))


def _pixels(size: str) -> int:
    height, _, width = size.partition("x")
    return int(height) * int(width) if height.isdigit() and width.isdigit() else 0


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _html(text: str, title: str) -> str:
    body = markdown.markdown(text, extensions=["tables"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
td img {{ max-width: 256px; }} p > img {{ max-width: 100%; }}
</style></head><body>
{body}
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=MlflowConfig.tracking_uri, help="MLflow store or server")
    parser.add_argument("--experiment", default=MlflowConfig.experiment, help="MLflow experiment")
    parser.add_argument(
        "--out", type=Path, help="folder for report.md, report.html and their images (default: reports/<experiment>)"
    )
    parser.add_argument("--filter", default="", help="MLflow filter on the runs, e.g. \"params.res = '1024'\"")
    args = parser.parse_args(argv)
    tracker = Tracker(MlflowConfig(tracking_uri=args.tracking_uri, experiment=args.experiment))
    try:
        runs = tracker.jobs(args.filter)
    except MlflowException as error:
        print(
            f"error: --filter {args.filter!r}: {error.message}; write MLflow's filter syntax, values quoted, "
            "e.g. \"params.res = '1024' and tags.outcome = 'ok'\"",
            file=sys.stderr,
        )
        return 2
    if not runs:
        where = f" matching {args.filter!r}" if args.filter else ""
        print(f"error: no job runs in experiment '{args.experiment}'{where}: nothing to report", file=sys.stderr)
        return 1
    out = args.out or Path("reports") / args.experiment
    write_report(tracker, out, runs)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
