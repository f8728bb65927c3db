"""Against a real MLflow tracking server on loopback, with SQLite and with PostgreSQL behind it: a sweep, read
back through the server's REST API, and the report made from the server."""

import glob
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, mlflow_server

from runner.report import main as report_main


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust authentication), from Debian's packages."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if not found:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    binaries = Path(found).parent
    folder = Path(tempfile.mkdtemp(prefix="runner-pg-"))
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    port = free_port()
    data = folder / "data"
    subprocess.run(
        [*as_postgres, binaries / "initdb", "-D", data, "-U", "mlflow", "--auth=trust"], check=True, capture_output=True
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    subprocess.run(
        [*as_postgres, binaries / "pg_ctl", "-D", data, "-l", folder / "log", "-o", options, "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://mlflow@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, binaries / "pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite or a PostgreSQL database, and proxied artifacts."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    database = f"sqlite:///{folder}/mlflow.db" if request.param == "sqlite" else request.getfixturevalue("postgres")
    with mlflow_server(folder, database) as url:
        yield url


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=30))


def test_sweep_against_a_server_reads_back_through_its_api(
    cli, server: str, test_accelerators: str, tmp_path: Path
) -> None:
    sweep = cli(
        "-m",
        "accelerator=none,same",
        "res=64",
        "runs=2",
        test_accelerators,
        tracking_uri=server,
    )
    assert sweep.code == 0, sweep.output

    experiment = rest(server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=diffusion-bench")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # the server keeps the artifacts
    found = rest(
        server,
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment["experiment_id"]], "filter": "tags.kind = 'job'"},
    )["runs"]
    runs = {run["info"]["run_name"]: run for run in found}
    assert set(runs) == {"tiny/t2i/64/none", "tiny/t2i/64/same"}
    same = runs["tiny/t2i/64/same"]
    metrics = {m["key"]: m["value"] for m in same["data"]["metrics"]}
    tags = {t["key"]: t["value"] for t in same["data"]["tags"]}
    params = {p["key"]: p["value"] for p in same["data"]["params"]}
    assert metrics["latency_s"] > 0 and metrics["ssim_vs_baseline"] == pytest.approx(1.0)
    assert "speedup_vs_baseline" in metrics and tags["baseline_run"] == runs["tiny/t2i/64/none"]["info"]["run_id"]
    assert params["accelerator"] == "same" and tags["outcome"] == "ok" and same["info"]["status"] == "FINISHED"
    image = urllib.request.urlopen(
        f"{server}/get-artifact?path=images/000_p00_seed0.png&run_uuid={same['info']['run_id']}", timeout=30
    ).read()
    assert image[:4] == b"\x89PNG"

    assert report_main(["--tracking-uri", server, "--out", str(tmp_path / "report")]) == 0
    assert "tiny/t2i/64" not in (tmp_path / "report" / "report.md").read_text().split("## Failed")[1]
