"""The `voco` command: help, subcommand registry, errors reported with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from voco import cli


def test_help_lists_available_commands():
    parser = cli.build_parser()
    text = parser.format_help()
    for name in cli._available():
        assert name in text


def test_unknown_command_exits_nonzero():
    r = subprocess.run([sys.executable, "-m", "voco.cli", "no-such-command"], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown command" in r.stderr


def test_registry_modules_define_the_interface():
    import importlib

    for _name, (mod, _help) in cli._available().items():
        m = importlib.import_module(f"voco.commands.{mod}")
        assert callable(m.add_arguments) and callable(m.run), mod


def test_config_command_prints_resolved_config(capsys):
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "preprocess:" in out and "regions:" in out


def test_config_command_names_bad_key(tmp_path, capsys):
    bad = tmp_path / "o.yaml"
    bad.write_text("preprocess:\n  roi: [1, 2]\n")
    assert cli.main(["config", "--override", str(bad)]) == 2
    assert "preprocess.roi" in capsys.readouterr().err
