"""What is typed on the command line, checked before Hydra composes it or anything runs.

A key the schema (``runner.config.Config``) does not have, a value a number or flag setting cannot take, a
model, task, accelerator or experiment ``conf/`` does not have, and an accelerator option its YAML does not set
are each refused in one line naming the closest right spelling, where Hydra would say several lines of its own
or nothing until the job fails.
"""

import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from runner.config import CONF, Config, ConfigError

# Options once selectable and since removed or renamed: group -> name -> [commit, what it became or None, why]. Only
# for the hint a misspelt or outdated name gets, so an install without the benchmarks folder goes without it.
RETIRED_FILE = CONF.parent / "benchmarks" / "conf" / "retired.yaml"
RETIRED: dict[str, dict[str, list]] = yaml.safe_load(RETIRED_FILE.read_text()) if RETIRED_FILE.is_file() else {}

OPEN = object()  # a dict of free keys: anything beneath it is allowed


def known_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema; OPEN for dict-typed settings whose own keys are free."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for item in fields(cls):
        key, kind = f"{prefix}{item.name}", hints[item.name]
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        nested = kind if is_dataclass(kind) else next((a for a in typing.get_args(kind) if is_dataclass(a)), None)
        nested = nested if is_dataclass(kind) or optional else None
        if nested is not None:
            keys[key] = nested
            keys.update(known_keys(nested, f"{key}."))
        else:
            keys[key] = OPEN if typing.get_origin(kind) is dict or kind is Any else kind
    return keys


NUMBERS = {int: "a whole number", float: "a number", bool: "true or false"}


def value_error(key: str, value: object) -> str | None:
    """For a command-line value that a number or flag setting cannot take, the one line that names it and what
    to give instead (e.g. ``res=abc``); None when it fits or the key takes anything."""
    kind = known_keys().get(key)
    allowed = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    wanted = next((t for t in NUMBERS if t in allowed), None)
    text = str(value)
    if wanted is None or value is None or text.startswith("${") or (type(None) in allowed and text == "null"):
        return None
    try:
        {int: int, float: float, bool: lambda v: {"true": 1, "false": 0}[v.lower()]}[wanted](text)
    except (ValueError, KeyError):
        return f"{key}={text}: {key} takes {NUMBERS[wanted]} (python -m runner --help describes every key)"
    return None


def config_dirs(parsed: list) -> list[Path] | None:
    """The folders Hydra looks in for a group's options, in its order: ``conf/``, then each ``file://`` folder of a
    ``hydra.searchpath`` override (a relative one from the working directory); None where the search path holds a
    source that is no folder here (``pkg://``), whose options cannot be listed before composing."""
    entries = next((o.value() for o in parsed if o.key_or_group == "hydra.searchpath"), [])
    return search_dirs(entries if isinstance(entries, list) else [entries])


def search_dirs(entries: Sequence[object]) -> list[Path] | None:
    """``conf/`` and the folders of a search path's ``file://`` entries; None where one is another kind of source."""
    if not all(str(entry).startswith("file://") for entry in entries):
        return None
    return [CONF, *(Path(str(entry).removeprefix("file://")).absolute() for entry in entries)]


def shown(path: Path) -> str:
    """A config file's path as a message names it: from the project's root where it lies beneath it."""
    return str(path.relative_to(CONF.parent)) if path.is_relative_to(CONF.parent) else str(path)


def option_file(dirs: list[Path], group: str, name: str) -> Path | None:
    """The YAML Hydra would select for ``group=name``: the first of ``dirs`` that has it."""
    return next((d / group / f"{name}.yaml" for d in dirs if (d / group / f"{name}.yaml").is_file()), None)


def check_override_keys(overrides: list[str], groups: set[str]) -> None:
    """Refuse, before anything runs, a command-line key the schema does not have, naming the closest one, and
    a single value a number or flag setting cannot take, or a single model, task, accelerator or experiment
    ``conf/`` (and the folders of a ``hydra.searchpath`` override) do not have (a swept value fails only its own job,
    in the sweep; with a ``pkg://`` search path the options are Hydra's to check). ``groups`` are the config groups
    (model, task, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # Hydra's own parser then says what is wrong with the syntax
    keys = known_keys()
    dirs = config_dirs(parsed)
    for override in parsed:
        key = override.key_or_group
        problem = None if override.is_sweep_override() else value_error(key, override.value())
        if problem:
            raise ConfigError(problem)
        if key in groups and not (override.is_sweep_override() or dirs is None or override.value() is None):
            options = sorted({path.stem for folder in dirs for path in (folder / key).glob("*.yaml")})
            if str(override.value()) not in options:
                raise ConfigError(no_such_option(key, str(override.value()), options, dirs))
        if key.split(".")[0].split("/")[0] == "hydra" or key in groups or "/" in key or key in keys:
            continue
        problem = accelerator_option_problem(key, parsed, adding=override.is_add())
        if problem:
            raise ConfigError(problem)
        if any(key.startswith(f"{open_key}.") for open_key, kind in keys.items() if kind is OPEN):
            continue
        close = difflib.get_close_matches(key, [*keys, *groups], n=1)
        hint = f"did you mean {close[0]}?" if close else "python -m runner --help lists every key"
        raise ConfigError(f"{key}: no such key; {hint}")


def no_such_option(group: str, option: str, options: list[str], dirs: Sequence[Path] = (CONF,)) -> str:
    """One line for a model, task, accelerator or experiment that none of ``dirs`` (``conf/`` and the search path's
    folders) has: what became of it where it once existed, else the closest name, conf/'s choices (the search path's
    counted), and how to add one."""
    retired = RETIRED.get(group, {}).get(option)
    if retired:
        commit, became, why = retired
        instead = f"; use {group}={became}" if became else ""
        return (
            f"{group}={option}: retired in commit {commit}: {why}{instead} (to run it as it was measured: "
            f"git checkout {commit}^)"
        )
    variants = CONF.parent / "benchmarks" / "conf" / group
    off_path = variants.parent not in dirs  # the variants measured in BENCHMARKS.md, off the default path
    select = f"hydra.searchpath=[file://{variants.parent}]"
    if off_path and (variants / f"{option}.yaml").is_file():
        return (
            f"{group}={option}: a variant in benchmarks/conf/{group}/, not in conf/{group}/; add {select} to select it"
        )
    close = difflib.get_close_matches(option, options, n=1)
    near = difflib.get_close_matches(option, [path.stem for path in variants.glob("*.yaml")], n=1) if off_path else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    if near and not close:
        hint = f" (did you mean the variant {near[0]}? add {select})"
    # conf/'s own choices in full; a search path's (benchmarks/conf/ holds some forty variants) counted, not listed
    own = [name for name in options if (CONF / group / f"{name}.yaml").is_file()]
    more = len(options) - len(own)
    folders = [f"in {shown(folder / group)}/" for folder in dirs[1:] if (folder / group).is_dir()]
    listed = [", ".join(own)] if own else []
    if more:
        listed.append(f"the {more} {' and '.join(folders) or 'on the search path'}")
    choices = ", or one of ".join(listed)
    return f"{group}={option}: no such {group}{hint}; choose one of {choices} (or add conf/{group}/{option}.yaml)"


def accelerator_option_problem(key: str, parsed: list, adding: bool = False) -> str | None:
    """For an ``accelerator.<option>=`` override, the one line naming a chosen accelerator whose YAML has no such
    option (Hydra's own refusal is a struct error of several lines); None where every chosen one has it, or where
    they cannot be known before composing (an experiment, a search path with a ``pkg://`` source). ``adding`` (a
    ``+`` override) also accepts an option the accelerator's class takes that its YAML leaves out."""
    if not key.startswith("accelerator."):
        return None
    segments = key.split(".")
    option = segments[1]
    overrides = {override.key_or_group: override for override in parsed}
    dirs = config_dirs(parsed)
    if "experiment" in overrides or dirs is None:
        return None
    chosen = overrides.get("accelerator")
    if chosen is None:
        defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
        names = [entry["accelerator"] for entry in defaults if isinstance(entry, dict) and "accelerator" in entry]
    else:
        names = list(chosen.sweep_string_iterator()) if chosen.is_sweep_override() else [str(chosen.value())]
    found = [option_file(dirs, "accelerator", name) for name in names]
    files = {name: file for name, file in zip(names, found, strict=True) if file is not None}
    if len(files) < len(names):
        return None  # a choice no folder has: refused as such where it is checked, or by Hydra
    configs = {name: yaml.safe_load(file.read_text()) or {} for name, file in files.items()}
    options = {name: [k for k in configs[name] if k != "_target_"] for name in names}
    if adding:
        options = {
            name: [*known, *(f for f in fields_of(configs[name]) if f not in known)] for name, known in options.items()
        }
    lacking = [name for name in names if option not in options[name]]
    if not lacking:
        if option != "parts" or len(segments) < 4:
            return None
        parts = {name: (configs[name]["parts"], shown(files[name])) for name in names}
        problems = (chain_part_problem(key, name, *parts[name], adding) for name in names)
        return next((problem for problem in problems if problem), None)
    having = [name for name in names if name not in lacking]
    name = lacking[0]
    if having:
        return (
            f"{key}: accelerator {name} has no such option ({', '.join(having)} has); sweep the accelerators that "
            "have it on their own, or add a YAML to conf/accelerator/ that sets it"
        )
    if not options[name]:
        return f"{key}: accelerator {name} takes no options ({shown(files[name])})"
    close = difflib.get_close_matches(option, options[name], n=1)
    hint = f"did you mean accelerator.{close[0]}?" if close else f"{shown(files[name])} says what each does"
    return f"{key}: accelerator {name} has no such option (its options: {', '.join(options[name])}); {hint}"


def fields_of(node: dict[str, Any]) -> list[str]:
    """The options of the dataclass a YAML node's ``_target_`` names; none where it cannot be imported here or is
    no dataclass (its YAML's keys alone then)."""
    from hydra.utils import get_class

    try:
        return [f.name for f in fields(get_class(node["_target_"]))]
    except (ImportError, ValueError, TypeError, KeyError):
        return []


def chain_part_problem(
    key: str, name: str, parts: list[dict[str, Any]], chain_file: str, adding: bool = False
) -> str | None:
    """For ``accelerator.parts.<N>.<option>=`` on chain ``name``: the one line saying that the chain has no part N,
    or that its part N has no such option, or that it has one the YAML leaves out (which only ``+`` adds);
    None where the YAML sets it, or where ``adding`` and the part takes it."""
    index, option = key.split(".")[2:4]
    classes = [part["_target_"].rsplit(".", 1)[-1] for part in parts]

    if not index.isdigit() or int(index) >= len(parts):
        listed = ", ".join(f"{i} {cls}" for i, cls in enumerate(classes))
        owners = [i for i, part in enumerate(parts) if option in part or option in fields_of(part)]
        fix = (
            f"did you mean accelerator.parts.{owners[0]}.{option}?"
            if owners
            else f"number a part from 0 to {len(parts) - 1}"
        )
        return f"{key}: accelerator {name} has no part {index} (its parts: {listed}); {fix}"
    part = parts[int(index)]
    if option in part:
        return None
    where = f"part {index} of accelerator {name}, {classes[int(index)]},"
    declared = fields_of(part)
    if option in declared:
        return (
            None
            if adding
            else f"{key}: {where} takes {option}, but {chain_file} does not set it: add it with +{key}=..."
        )
    known = [k for k in part if k != "_target_"] + [k for k in declared if k not in part]
    if not known:
        return f"{key}: {where} takes no options ({chain_file})"
    close = difflib.get_close_matches(option, known, n=1)
    hint = f"did you mean accelerator.parts.{index}.{close[0]}?" if close else f"{chain_file} lists the parts"
    return f"{key}: {where} has no such option (its options: {', '.join(known)}); {hint}"
