"""Every command's ``--help`` opens with what the command does and how to see its config."""

from __future__ import annotations

import importlib

import pytest
from cli_testing import run_command

from stafinetune.commands import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_opens_with_what_the_command_does(name, capsys):
    main = importlib.import_module(f"stafinetune.commands.{name}").main
    code, out, err = run_command(main, "--help", capsys=capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"stafinetune-{name}: {COMMANDS[name]}."
    assert f"stafinetune-{name} [overrides] --cfg job" in out
    assert "powered by Hydra" not in out
    assert "== Config ==" in out  # Hydra's own list of groups and the config follow
