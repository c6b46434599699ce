"""The environment recorded with every run (issue: library drift must be visible in results)."""

from __future__ import annotations

import sys

import numpy
import torch

import sdlora
from sdlora.environment import (
    PACKAGES,
    capture_environment,
    continue_environments,
    environment_changes,
    short_environment,
)


def test_capture_names_the_versions_in_use():
    env = capture_environment(torch.device("cpu"))
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["torch"] == torch.__version__
    assert env["numpy"] == numpy.__version__
    assert env["sdlora"] == sdlora.__version__
    assert env["device"] == "cpu"
    assert set(PACKAGES) <= set(env)
    # The tests run from a git checkout of the project: the commit is a 40-hex sha.
    if env["git_commit"] is not None:
        assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)


def test_changes_list_every_differing_key():
    old = {"torch": "2.1", "timm": "1.0", "device": "cpu"}
    new = {"torch": "2.2", "timm": "1.0", "device": "cpu", "peft": "0.21"}
    assert environment_changes(old, new) == ["torch: 2.1 -> 2.2", "peft: None -> 0.21"]
    assert environment_changes(old, dict(old)) == []


def test_continue_keeps_history_only_when_something_changed():
    first = {"torch": "2.1", "git_dirty": False}
    earlier, changes = continue_environments(first, [], {"torch": "2.1", "git_dirty": True}, 2)
    assert earlier == [] and changes == []  # an edited checkout alone is not another environment
    earlier, changes = continue_environments(first, [], {"torch": "2.2", "git_dirty": False}, 2)
    assert changes == ["torch: 2.1 -> 2.2"]
    assert earlier == [{"torch": "2.1", "git_dirty": False, "until_task": 2}]
    # A record written before environments existed has none: nothing to compare, nothing invented.
    assert continue_environments({}, [], {"torch": "2.2"}, 3) == ([], [])


def test_short_form_for_report_tables():
    env = {"python": "3.11.7", "torch": "2.14.1", "timm": None, "transformers": "5.25.0", "device": "cpu"}
    assert short_environment(env) == "py3.11.7 torch 2.14.1 tf 5.25.0 cpu"
    assert short_environment({}) == "n/a"
