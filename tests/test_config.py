"""Every option of every config group composes; bad values are refused with the key, the value and the fix."""

import collections
import dataclasses
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from runner.accelerators import Accelerator, build_accelerator
from runner.config import (
    CONF,
    Config,
    ConfigError,
    check,
    compose_job,
    config_hash,
    job_name,
    logged_params,
    run_name,
    skip_reason,
    switched_config,
    to_config,
)
from runner.overrides import check_override_keys, known_keys, no_such_option

GROUPS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in ("model", "task", "accelerator")}


@pytest.mark.parametrize("model", GROUPS["model"])
@pytest.mark.parametrize("task", GROUPS["task"])
@pytest.mark.parametrize("accelerator", GROUPS["accelerator"])
def test_every_option_composes(model: str, task: str, accelerator: str) -> None:
    cfg = to_config(compose_job(f"model={model}", f"task={task}", f"accelerator={accelerator}"))
    assert (cfg.names.model, cfg.names.task, cfg.names.accelerator) == (model, task, accelerator)
    assert cfg.steps == cfg.model.steps and cfg.height == cfg.width == cfg.res
    assert cfg.model.architecture and Path(CONF.parent, "runner", "architectures", cfg.model.architecture).is_dir()
    assert isinstance(build_accelerator(cfg.accelerator), Accelerator)
    if skip_reason(cfg) is None:
        assert cfg.model.tasks[task].pipeline.startswith("diffusers.")


@pytest.mark.parametrize("accelerator", GROUPS["accelerator"])
def test_every_accelerator_option_can_be_set_on_the_command_line(accelerator: str) -> None:
    """Hydra refuses a key its YAML does not list ("not in struct"), so each YAML lists every option of its class."""
    options = OmegaConf.to_container(OmegaConf.load(CONF / "accelerator" / f"{accelerator}.yaml"))
    if "parts" in options:  # a chain: its parts' options are set in the YAML
        return
    cls = get_class(options["_target_"])
    assert {option.name for option in dataclasses.fields(cls)} <= set(options), accelerator


@pytest.mark.parametrize(
    "variant", sorted(p.stem for p in (CONF.parent / "benchmarks/conf/accelerator").glob("*.yaml"))
)
def test_benchmark_variants_compose_from_their_search_path(variant: str) -> None:
    searchpath = f"hydra.searchpath=[file://{CONF.parent}/benchmarks/conf]"
    cfg = to_config(compose_job(f"accelerator={variant}", searchpath))
    assert cfg.names.accelerator == variant and isinstance(build_accelerator(cfg.accelerator), Accelerator)


def test_a_relative_file_search_path_is_read_from_the_working_directory_and_a_package_one_left_to_hydra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A variant's misspelt option is refused before composing where the search path's folders can be read (a
    relative ``file://`` one from the working directory, as Hydra reads it); with a ``pkg://`` source too, nothing
    is refused here (Hydra checks it)."""
    monkeypatch.chdir(CONF.parent)
    option = ["accelerator=cg_fast_layout_text", "+accelerator.parts.2.pin_layot=true"]
    groups = set(GROUPS)
    with pytest.raises(ConfigError, match=r"^accelerator.parts.2.pin_layot: part 2 of accelerator cg_fast_layout_text"):
        check_override_keys([*option, "hydra.searchpath=[file://benchmarks/conf]"], groups)
    check_override_keys([*option, "hydra.searchpath=[file://benchmarks/conf,pkg://somewhere.conf]"], groups)


def test_a_misspelt_option_names_confs_choices_and_counts_the_search_paths() -> None:
    """What a swept job Hydra could not compose says (Hydra hands over every option, conf/'s and the search path's,
    and not where each lies): conf/'s choices named, the others counted."""
    options = ["compile_graph", "compile_graph_fast", "cg_fast_layout", "fp8_layout", "none"]
    assert no_such_option("accelerator", "cg_fast_layot", options) == (
        "accelerator=cg_fast_layot: no such accelerator (did you mean cg_fast_layout?); choose one of compile_graph, "
        "compile_graph_fast, none, or one of the 2 on the search path (or add conf/accelerator/cg_fast_layot.yaml)"
    )
    assert no_such_option("accelerator", "fp8_lay", ["fp8_layout"]).endswith(
        "choose one of the 1 on the search path (or add conf/accelerator/fp8_lay.yaml)"
    )


def test_a_name_close_to_a_variant_off_the_search_path_says_how_to_select_it() -> None:
    assert no_such_option("accelerator", "cg_fast_layot", ["compile_graph", "none"]).startswith(
        "accelerator=cg_fast_layot: no such accelerator (did you mean the variant cg_fast_layout? add "
        f"hydra.searchpath=[file://{CONF.parent}/benchmarks/conf]); choose one of compile_graph, none"
    )


def test_a_retired_name_says_what_became_of_it_and_how_to_run_it_as_measured() -> None:
    """A name BENCHMARKS.md's commands still use, since folded into another accelerator or removed, is answered with
    that, not with a look-alike (cg_bf16_pinned's closest name is fp8_unpinned)."""
    assert no_such_option("accelerator", "cg_bf16_pinned", ["compile_graph_bf16", "fp8_unpinned"]) == (
        "accelerator=cg_bf16_pinned: retired in commit 60e2532: the layout parts became part of compile_graph_bf16; "
        "use accelerator=compile_graph_bf16 (to run it as it was measured: git checkout 60e2532^)"
    )
    removed = no_such_option("accelerator", "compile_graph_tuned", ["compile_graph"])
    assert removed.startswith("accelerator=compile_graph_tuned: retired in commit 5444324: inductor_tuning was removed")
    assert "use accelerator=" not in removed and "\n" not in removed


def tree(commit: str) -> set[str]:
    """The paths of files in ``commit`` of this clone."""
    listed = subprocess.run(
        ["git", "-C", str(CONF.parent), "ls-tree", "-r", "--name-only", commit],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(listed.stdout.split())


def test_every_retired_name_is_gone_what_it_became_is_there_and_its_commit_removed_it() -> None:
    """benchmarks/conf/retired.yaml held to the tree: no retired name selectable again (a YAML of that name would never
    be reached), every name it points to selectable, and, where the clone has the history, each commit the one whose
    parent still had the name (a clone without it, or no git, checks the rest)."""
    from runner.overrides import RETIRED

    assert RETIRED["accelerator"]
    folders = {group: [CONF / group, CONF.parent / "benchmarks" / "conf" / group] for group in RETIRED}
    shallow = ["git", "-C", str(CONF.parent), "rev-parse", "--is-shallow-repository"]
    has_history = shutil.which("git") and subprocess.run(shallow, capture_output=True, text=True).stdout == "false\n"
    for group, names in RETIRED.items():
        for name, (commit, became, why) in names.items():
            assert not any((folder / f"{name}.yaml").is_file() for folder in folders[group]), name
            assert became is None or any((folder / f"{became}.yaml").is_file() for folder in folders[group]), name
            assert len(commit) == 7 and int(commit, 16) >= 0 and why, name
            if has_history:
                paths = {f"conf/{group}/{name}.yaml", f"benchmarks/conf/{group}/{name}.yaml"}
                assert paths & tree(f"{commit}^") and not paths & tree(commit), f"{commit} did not remove {name}"


def test_groups_are_the_ones_the_issue_names() -> None:
    assert {
        "realvisxl_v4",
        "realvisxl_v4_lightning",
        "instruct_pix2pix",
        "sdxl_base",
        "tiny_sdxl",
        "tiny_pix2pix",
    } <= set(GROUPS["model"])
    assert {"t2i", "i2i"} <= set(GROUPS["task"])
    assert "none" in GROUPS["accelerator"]


def test_height_and_width_follow_res_unless_set() -> None:
    cfg = to_config(compose_job("res=512"))
    assert (cfg.height, cfg.width) == (512, 512)
    cfg = to_config(compose_job("res=512", "width=768"))
    assert (cfg.height, cfg.width) == (512, 768)
    assert run_name("m", "t2i", 512, 768, "none") == "m/t2i/512x768/none"
    assert run_name("m", "t2i", 1024, 1024, "none", 1, 512) == "m/t2i/1024+512/none"
    assert run_name("m", "t2i", 1024, 1024, "none", 4, None, "bf16") == "m/t2i/1024-b4-bf16/none"  # set by hand
    assert job_name(to_config(compose_job("res=512", "dtype=bf16"))) == "tiny/t2i/512-bf16/none"
    assert job_name(to_config(compose_job("res=512"))) == "tiny/t2i/512/none"  # auto: the device's own


# Characters of a job's name MLflow 3.17's run list shows in its default column width, the job unfolded under its
# sweep (benchmarks/screenshots.sh); a run at the top level shows about 20.
SHOWN_NESTED, SHOWN = 15, 20


def experiment_jobs(experiment: str) -> list[list[str]]:
    """The overrides of every job a ready-made sweep (conf/experiment/) runs."""
    params = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    swept = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return [[f"+experiment={experiment}", *job] for job in itertools.product(*swept)]


def real_model_jobs() -> list[list[str]]:
    """Every accelerator on every task of the real models, at 512 and 1024 px."""
    return [
        [f"model={model}", f"task={task}", f"res={res}", f"accelerator={accelerator}"]
        for model in ("realvisxl_v4", "realvisxl_v4_lightning", "instruct_pix2pix", "sdxl_base")
        for task in GROUPS["task"]
        for res in (512, 1024)
        for accelerator in GROUPS["accelerator"]
    ]


@pytest.mark.parametrize(
    ("jobs", "shown"),
    [
        *((experiment_jobs(p.stem), SHOWN_NESTED) for p in sorted((CONF / "experiment").glob("*.yaml"))),
        (real_model_jobs(), SHOWN),  # every accelerator on one job: unique once the column is a little wider
    ],
)
def test_run_names_differ_within_what_mlflow_shows(jobs: list[list[str]], shown: int) -> None:
    names = [job_name(to_config(compose_job(*job))) for job in jobs]
    assert len(set(names)) == len(names)
    prefixes = collections.Counter(name[:shown] for name in names)
    assert [prefix for prefix, count in prefixes.items() if count > 1] == []


def test_labels_name_runs_and_are_neither_options_nor_identity() -> None:
    cfg = to_config(compose_job("model=realvisxl_v4_lightning", "task=i2i", "accelerator=deepcache_compile"))
    assert job_name(cfg) == "RV4L/i2i/1024/dc+compile"
    assert "label" not in cfg.accelerator and "accelerator.label" not in logged_params(cfg)
    relabelled = to_config(
        compose_job(
            "model=realvisxl_v4_lightning",
            "task=i2i",
            "accelerator=deepcache_compile",
            "model.label=L",
            "accelerator.label=DC",
        )
    )
    assert job_name(relabelled) == "L/i2i/1024/DC" and config_hash(relabelled) == config_hash(cfg)
    assert job_name(to_config(compose_job("model=tiny_sdxl"))) == "tiny/t2i/1024/none"  # no label: the name


def test_pix2pix_has_no_text_to_image() -> None:
    reason = skip_reason(to_config(compose_job("model=instruct_pix2pix", "task=t2i")))
    assert reason == "model instruct_pix2pix has no t2i pipeline (it offers: i2i)"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("res=500", "res=500: must be a positive multiple of 8"),
        ("res=0", "res=0: must be a positive multiple of 8"),
        ("height=-8", "height=-8: must be a positive multiple of 8"),
        ("switch_res=100", "switch_res=100: must be a positive multiple of 8"),
        ("switch_res=1024", "switch_res=1024: equals res; switch to another size, or drop switch_res"),
        ("runs=0", "runs=0: must be at least 1"),
        ("steps=0", "steps=0: must be at least 1"),
        ("warmup=-1", "warmup=-1: must be at least 0"),
        ("device=tpu", "device=tpu: use auto, cpu, cuda or cuda:N"),
        ("dtype=fp8", "dtype=fp8: choose one of auto, fp16, bf16, fp32"),
        ("model.weights=cached", "model.weights=cached: choose one of pretrained, random"),
        ("task.inputs=[prompt,mask]", "task.inputs=mask: choose one of prompt, image"),
    ],
)
def test_bad_values_are_refused_with_key_value_and_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        to_config(compose_job(override))


def test_switching_sizes_takes_what_follows_res_along_and_refuses_a_size_set_apart() -> None:
    cfg = compose_job("res=512", "switch_res=1024")
    switched = switched_config(cfg)
    assert to_config(cfg).switch_res == 1024 and switched_config(compose_job("res=512")) is None
    assert (switched.res, switched.height, switched.width, switched.switch_res) == (1024, 1024, 1024, None)
    assert switched.task.call_args == {"height": 1024, "width": 1024}
    with pytest.raises(ConfigError, match=r"^switch_res=512 switches between square sizes, but height=768 "):
        to_config(compose_job("height=768", "switch_res=512"))


def test_pretrained_needs_an_id() -> None:
    with pytest.raises(ConfigError, match=r"model.id is empty for model=tiny_sdxl: .*model.weights=random"):
        to_config(compose_job("model.weights=pretrained"))


def test_defaults_check_clean() -> None:
    cfg = to_config(compose_job())
    assert isinstance(cfg, Config)
    check(cfg)
    assert (cfg.warmup, cfg.runs, cfg.device, cfg.dtype) == (1, 10, "auto", "auto")
    assert cfg.mlflow.tracking_uri == "sqlite:///mlruns/mlflow.db"


def test_a_chain_part_s_bad_option_names_the_part_and_what_it_takes() -> None:
    none = {"_target_": "runner.accelerators.none.NoAccelerator"}
    part = {"_target_": "runner.accelerators.prompt_graph.PromptGraphAccelerator", "compile_encoders": "ture"}
    chain = build_accelerator({"_target_": "runner.accelerators.chain.Chain", "parts": [none, part]})
    expected = (
        r"^accelerator.parts.1.compile_encoders: Value 'ture' is not a valid bool .*; it takes a value of type bool, "
        r"by default false$"
    )
    with pytest.raises(ConfigError, match=expected):
        chain.check(torch.device("cpu"))


def test_accelerator_options_are_type_checked() -> None:
    target = "tests.fake_accelerators.Options"
    assert build_accelerator({"_target_": target, "interval": 3}).interval == 3
    with pytest.raises(ConfigError, match=r"^accelerator.interval: Value 'often'.*; it takes a value of type int, by"):
        build_accelerator({"_target_": target, "interval": "often"})
    with pytest.raises(ConfigError, match=r"accelerator.*speed"):
        build_accelerator({"_target_": target, "speed": 2})
    with pytest.raises(ConfigError, match=r"not an accelerator \(subclass runner.accelerators.Accelerator\)"):
        build_accelerator({"_target_": "tests.fake_accelerators.NotAnAccelerator"})


def test_help_lists_every_setting_of_the_schema() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "runner", "--help"], cwd=CONF.parent, capture_output=True, text=True, timeout=120
    ).stdout
    for key in known_keys():
        if not key.startswith("names") and key not in ("quality", "cost", "mlflow"):  # Hydra's choices; sections
            assert f"\n  {key} " in shown, key
    assert "model: instruct_pix2pix, realvisxl_v4" in shown  # and every group's options


def test_the_readmes_table_names_only_real_keys() -> None:
    table = (CONF.parent / "README.md").read_text().split("| key | values | meaning |")[1].split("\n\n")[0]
    keys = {key for row in table.splitlines()[2:] for key in re.findall(r"`([a-z_.]+)`", row.split("|")[1])}
    assert keys and keys <= set(known_keys()), keys - set(known_keys())
