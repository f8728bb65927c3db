"""Write the job runs of an MLflow store (e.g. a database brought back from the GPU) to JSON, for the
record behind BENCHMARKS.md (params, metrics, per-call series, tags):
    python benchmarks/export_runs.py sqlite:///path/mlflow.db OUT.json"""

import json
import sys

from mlflow import MlflowClient


def main(tracking_uri: str, out: str) -> None:
    client = MlflowClient(tracking_uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.kind = 'job'", order_by=["attributes.start_time ASC"])
    record = [
        {
            "name": run.info.run_name,
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start_time_ms": run.info.start_time,
            "params": run.data.params,
            "metrics": run.data.metrics,
            "series": series(client, run),
            "tags": {key: value for key, value in run.data.tags.items() if not key.startswith("mlflow.")},
        }
        for run in runs
    ]
    with open(out, "w") as file:
        json.dump(record, file, indent=1, sort_keys=True)
    print(f"{len(record)} runs -> {out}")


def series(client: MlflowClient, run) -> dict[str, list[float]]:
    """The metrics logged once per step (e.g. every timed call's latency), in step order."""
    found = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        if len(history) > 1:
            found[key] = [metric.value for metric in sorted(history, key=lambda metric: metric.step)]
    return found


if __name__ == "__main__":
    main(*sys.argv[1:])
