"""What a run records of the code it ran: the commit, and the tree of the files as they were."""

import subprocess
from pathlib import Path

import pytest
import torch

from runner import environment


def git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_an_edited_checkout_names_the_tree_of_the_code_that_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A GPU machine's copy may hold today's files under an older ``.git``: its commit and dirty flag then point
    at the wrong code, while the tree names the commit that holds what ran."""
    git(tmp_path, "init", "-q")
    (tmp_path / "step.py").write_text("faster = False\n")
    git(tmp_path, "add", "step.py")
    git(tmp_path, "commit", "-qm", "old")
    monkeypatch.setattr(environment, "PROJECT", tmp_path)
    cpu = torch.device("cpu")
    clean = environment.environment_tags(cpu)
    assert clean["git_dirty"] == "false" and clean["git_tree"] == git(tmp_path, "rev-parse", "HEAD^{tree}")

    (tmp_path / "step.py").write_text("faster = True\n")
    (tmp_path / "untracked.txt").write_text("not code\n")
    edited = environment.environment_tags(cpu)
    assert edited["git_commit"] == clean["git_commit"] and edited["git_dirty"] == "true"
    assert git(tmp_path, "diff", "--cached", "--name-only") == ""  # the checkout's index as it was: nothing staged
    git(tmp_path, "commit", "-qam", "new")  # the commit that holds the code that ran
    assert edited["git_tree"] == git(tmp_path, "rev-parse", "HEAD^{tree}") != clean["git_tree"]

    monkeypatch.setattr(environment, "PROJECT", tmp_path / "not-a-checkout")
    assert environment.environment_tags(cpu)["git_tree"] == environment.environment_tags(cpu)["git_commit"] == "unknown"
