"""Energy per image, the GPU's clock limits, throughput at batch sizes, and cost: a stand-in NVML for the
GPU's counters, real tiny sweeps for batches and prices."""

import sys
import time
import types

import pytest
from mlflow import MlflowClient

from runner.config import compose_job, to_config
from runner.measure import GpuMeter, busy_share, energy_metrics
from runner.record import WorkerResult
from runner.worker import price


def stand_in_counter(monkeypatch: pytest.MonkeyPatch, readings_mj: list[float] | None) -> None:
    """NVML with an energy counter that returns ``readings_mj`` in turn, or none (raises) for None."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: uuid
    values = iter(readings_mj or [])

    def counter(handle):
        if readings_mj is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return next(values)

    nvml.nvmlDeviceGetTotalEnergyConsumption = counter
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_energy_is_read_from_the_gpus_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_counter(monkeypatch, [1_000_000.0, 1_500_000.0])  # 500 J between the reads
    with GpuMeter("GPU-a") as meter:
        pass
    assert meter.joules == pytest.approx(500.0) and meter.seconds > 0
    meter.seconds = 2.0  # as if the 10 images took 2 s
    assert energy_metrics(meter, images=10) == {
        "energy_j_per_image": pytest.approx(50.0),
        "avg_power_w": pytest.approx(250.0),
        "images_per_kwh": pytest.approx(10 / (500 / 3.6e6)),
    }


def test_the_time_the_gpu_was_held_down_by_its_power_limit_or_heat_is_a_share_of_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stand_in_counter(monkeypatch, [1_000_000.0, 1_500_000.0])
    nvml = sys.modules["pynvml"]
    nvml.NVML_PERF_POLICY_POWER, nvml.NVML_PERF_POLICY_THERMAL, nvml.NVML_TEMPERATURE_GPU = 0, 1, 0
    # NVML's violation counters (ns since the driver loaded), read before and after: 0.5 s power-capped,
    # no thermal slowdown; the temperature 61 then 67 degrees
    violations = {0: iter([7_000_000_000, 7_500_000_000]), 1: iter([2_000_000_000, 2_000_000_000])}
    nvml.nvmlDeviceGetViolationStatus = lambda handle, policy: types.SimpleNamespace(
        referenceTime=0, violationTime=next(violations[policy])
    )
    temperatures = iter([61, 67])
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: next(temperatures)
    with GpuMeter("GPU-a") as meter:
        pass
    share = 0.5 / meter.seconds  # of the block's wall time, however long the empty block took
    assert meter.joules == pytest.approx(500.0) and meter.clocks_why == ""
    assert meter.clock_limits == {
        "power_capped_share": pytest.approx(share),
        "thermal_capped_share": 0.0,
        "gpu_temp_start_c": 61.0,
        "gpu_temp_end_c": 67.0,
    }


def test_the_gpus_busy_share_is_the_mean_of_the_utilisation_samples_taken_inside_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stand_in_counter(monkeypatch, [1_000_000.0, 1_500_000.0, 2_000_000.0, 2_500_000.0])
    nvml = sys.modules["pynvml"]
    nvml.NVML_GPU_UTILIZATION_SAMPLES = 4
    asked = []

    def samples(handle, kind, since_us):
        """The driver's buffer: samples stamped in epoch microseconds, value type 1 (unsigned int), out of
        order; one from before the block, which NVML may hand back however recent the time asked for."""
        asked.append(since_us)
        assert kind == 4
        stamped = [(since_us + 400_000, 40), (since_us - 100_000, 100), (since_us + 200_000, 60)]
        return 1, [
            types.SimpleNamespace(timeStamp=stamp, sampleValue=types.SimpleNamespace(uiVal=value))
            for stamp, value in stamped
        ]

    nvml.nvmlDeviceGetSamples = samples
    before = time.time_ns() // 1000
    with GpuMeter("GPU-a") as meter:
        pass
    assert meter.busy_why == ""
    assert meter.busy == {"gpu_busy_share": pytest.approx(0.5), "gpu_busy_samples": 2.0, "gpu_busy_covered_share": 1.0}
    assert len(asked) == 1 and before <= asked[0] <= time.time_ns() // 1000  # asked once, at the end, since the start

    def none_kept(handle, kind, since_us):
        raise RuntimeError("NVMLError_NotFound")

    nvml.nvmlDeviceGetSamples = none_kept
    with GpuMeter("GPU-a") as idle:
        pass
    assert idle.busy == {} and idle.busy_why == "RuntimeError: NVMLError_NotFound" and idle.joules == 500.0


def test_a_block_longer_than_the_drivers_buffer_of_samples_says_how_much_of_it_they_cover() -> None:
    # the driver kept 4 samples 0.2 s apart, the last 0.8 s of a 4 s block
    samples = tuple((1_000_000 + 200_000 * index, percent) for index, percent in enumerate((50, 60, 70, 60)))
    assert busy_share(samples, seconds=4.0) == {
        "gpu_busy_share": pytest.approx(0.6),
        "gpu_busy_samples": 4.0,
        "gpu_busy_covered_share": pytest.approx(0.2),
    }
    assert busy_share(samples[:1], seconds=4.0) == {"gpu_busy_share": 0.5, "gpu_busy_samples": 1.0}  # no gap: unknown
    assert busy_share((), seconds=4.0) == {}


def test_clock_counters_a_gpu_does_not_keep_are_left_out_and_energy_still_read(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_counter(monkeypatch, [1_000_000.0, 1_500_000.0])  # energy only: no violation counters, no sensor
    with GpuMeter("GPU-a") as meter:
        pass
    assert meter.joules == pytest.approx(500.0) and meter.clock_limits == {} and meter.busy == {}
    assert meter.clocks_why.startswith("AttributeError")  # the stand-in has no nvmlDeviceGetViolationStatus
    assert meter.busy_why.startswith("AttributeError")  # ...nor nvmlDeviceGetSamples


def test_no_counter_logs_nothing_made_up(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_counter(monkeypatch, None)
    with GpuMeter("GPU-old") as meter:
        pass
    assert meter.joules is None and meter.why == "RuntimeError: NVML_ERROR_NOT_SUPPORTED"
    assert energy_metrics(meter, images=10) == {} and meter.clock_limits == {}
    with GpuMeter("") as cpu:
        pass
    assert cpu.joules is None and cpu.why == "not on a GPU"


def test_a_price_per_hour_becomes_the_cost_of_1000_images() -> None:
    result = WorkerResult(metrics={"images_per_s": 2.0}, facts={"device_name": "NVIDIA H100 80GB HBM3"})
    assert price(to_config(compose_job()), result) == {}  # no price: nothing logged
    assert price(to_config(compose_job("cost.gpu_hour_usd=3.6")), result) == {"usd_per_1k_images": pytest.approx(0.5)}
    by_device = to_config(compose_job("+cost.per_device={NVIDIA H100 80GB HBM3: 7.2}"))
    assert price(by_device, result) == {"usd_per_1k_images": pytest.approx(1.0)}


def test_a_batch_sweep_counts_every_image_and_compares_image_by_image(cli, test_accelerators: str) -> None:
    sweep = cli(
        "-m", "batch=1,2", "accelerator=none,same", "res=64", "runs=2", "cost.gpu_hour_usd=3.6", test_accelerators
    )
    assert sweep.code == 0, sweep.output
    runs = sweep.runs()
    client = MlflowClient(sweep.tracking_uri)
    by = {(r.data.params["batch"], r.data.params["accelerator"]): r for r in runs.values()}
    assert set(runs) >= {"tiny/t2i/64/none", "tiny/t2i/64-b2/none"}  # names tell batches apart
    images = sorted(a.path for a in client.list_artifacts(by[("2", "none")].info.run_id, "images"))
    assert images == [f"images/00{i}_p00_seed{i}_{k}.png" for i in (0, 1) for k in (0, 1)]
    assert len(client.list_artifacts(by[("1", "none")].info.run_id, "images")) == 2
    for (batch, _), run in by.items():
        metrics = run.data.metrics
        assert metrics["images_per_s"] == pytest.approx(int(batch) / metrics["latency_s"], rel=1e-6)
        assert metrics["latency_per_image_s"] == pytest.approx(metrics["latency_s"] / int(batch), rel=1e-6)
        assert metrics["usd_per_1k_images"] == pytest.approx(1 / metrics["images_per_s"], rel=1e-6)
        assert run.data.tags["energy"] == "unavailable: not on a GPU" and "energy_j_per_image" not in metrics
        assert run.data.tags["clock_limits"] == "unavailable: not on a GPU" and "power_capped_share" not in metrics
        assert run.data.tags["gpu_busy"] == "unavailable: not on a GPU" and "gpu_busy_share" not in metrics
        loops = [m.value for m in client.get_metric_history(run.info.run_id, "call_core_loop_ms")]
        assert len(loops) == 2 and all(loop > 0 for loop in loops)  # a fixed loop timed before each call
        assert metrics["launch_core_loop_ms"] == pytest.approx(sum(loops) / 2)  # the median of two
        assert metrics["launch_core_loop_cv"] == pytest.approx(abs(loops[0] - loops[1]) / sum(loops))
    assert by[("2", "same")].data.metrics["images_compared"] == 4  # image by image, all four
    assert by[("2", "same")].data.tags["baseline_run"] == by[("2", "none")].info.run_id  # its own batch's baseline


def test_a_batch_that_does_not_fit_fails_naming_the_memory(cli, test_accelerators: str) -> None:
    sweep = cli("-m", "accelerator=none,oom", "batch=8", "res=64", "runs=1", test_accelerators)
    assert sweep.code == 1
    error = sweep.runs()["tiny/t2i/64-b8/oom"].data.tags["error"]
    assert error.startswith("batch=8 does not fit on ") and "Tried to allocate 20.00 GiB" in error
    assert sweep.runs()["tiny/t2i/64-b8/none"].data.tags["outcome"] == "ok"  # the sweep went on
