"""SSIM and PSNR between the images of runs of different jobs, which the runner never compares (each job is
compared with its own baseline): e.g. a bfloat16 pipeline's images against the float16 `none`'s, the same
prompts and seeds. With the runner's own metric (runner/quality.py, ``similarity``):
    python benchmarks/cross_similarity.py TRACKING_URI OUT.json 'FILTER_A' 'FILTER_B' [...]
Each FILTER picks the newest finished run matching it (MLflow's filter, e.g. "params.dtype = 'bf16' and
params.accelerator = 'none'"); the first is the reference the others are compared with."""

import json
import sys

import torch

from runner.config import MlflowConfig
from runner.quality import similarity
from runner.tracking import Tracker


def main(tracking_uri: str, out: str, reference: str, *others: str) -> None:
    tracker = Tracker(MlflowConfig(tracking_uri=tracking_uri))
    runs = []
    for query in (reference, *others):
        found = [r for r in tracker.records(query) if r.ok]
        if not found:
            raise SystemExit(f"no finished run matches {query!r}")
        runs.append(found[-1])
    base = tracker.download_images(runs[0].run_id)
    rows = [
        {
            "run": run.name,
            "run_id": run.run_id,
            "dtype": run.params.get("dtype"),
            "against": runs[0].name,
            "against_run_id": runs[0].run_id,
            **similarity(tracker.download_images(run.run_id), base, torch.device("cpu")),
        }
        for run in runs[1:]
    ]
    for row in rows:
        print(json.dumps(row))
    with open(out, "w") as file:
        json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
