"""The `voco` command: help, subcommand registry, errors reported with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from voco import cli

# Every pipeline step the rules and DVC stages call (a command missing from the package must fail these tests, not
# drop silently out of the loop: _available() filters missing modules out, so the tests read the registry itself).
PIPELINE = ["synth", "download", "convert", "preprocess", "merge-manifest", "audit-leakage", "vocomni", "pretrain",
            "pseudolabel", "finetune", "evaluate", "report", "predict", "export", "container", "config", "dvc-index",
            "check"]


def test_registry_is_the_pipeline_and_every_module_exists():
    assert list(cli.COMMANDS) == PIPELINE
    assert cli._available() == cli.COMMANDS  # nothing registered is missing from the package


def test_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "voco.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    listed = re.findall(r"^    ([a-z][a-z-]+)\s+\S", r.stdout, re.M)
    assert listed == PIPELINE, r.stdout  # every command, in pipeline order, each with its help line
    for name, (_mod, help_) in cli.COMMANDS.items():
        first_words = r"\s+".join(map(re.escape, help_.split()[:3]))
        assert re.search(rf"^    {re.escape(name)}\s+{first_words}", r.stdout, re.M), name


def test_unknown_command_exits_nonzero():
    r = subprocess.run([sys.executable, "-m", "voco.cli", "no-such-command"], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown command 'no-such-command'" in r.stderr


def test_registry_modules_define_the_interface():
    import argparse
    import importlib

    for name, (mod, _help) in cli.COMMANDS.items():
        m = importlib.import_module(f"voco.commands.{mod}")
        assert callable(m.add_arguments) and callable(m.run), mod
        parser = argparse.ArgumentParser(prog=f"voco {name}")
        m.add_arguments(parser)  # the subcommand's options build (no clash, no import-time failure)
        assert parser.format_help().startswith(f"usage: voco {name}")


def test_training_commands_stop_on_signals_and_others_do_not():
    import importlib

    stops = {name for name, (mod, _) in cli.COMMANDS.items()
             if getattr(importlib.import_module(f"voco.commands.{mod}"), "STOPS_ON_SIGNALS", False)}
    assert stops == {"vocomni", "pretrain", "finetune"}


def test_rules_call_registered_commands_only():
    """Every `voco <command>` in the rules is a registered subcommand (rule name = subcommand = DVC stage)."""
    repo = Path(__file__).resolve().parents[1]
    text = "".join(p.read_text() for p in sorted((repo / "rules").glob("*.smk")))
    called = set(re.findall(r"^\s+\"[^\"#]*?(?:voco|\{params\.voco\}) ([a-z][a-z-]+) ", text, re.M))  # shell strings
    assert called and called <= set(cli.COMMANDS), called - set(cli.COMMANDS)


def test_config_command_prints_resolved_config(capsys):
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "preprocess:" in out and "regions:" in out


def test_config_command_names_bad_key(tmp_path, capsys):
    bad = tmp_path / "o.yaml"
    bad.write_text("preprocess:\n  roi: [1, 2]\n")
    assert cli.main(["config", "--override", str(bad)]) == 2
    assert "preprocess.roi" in capsys.readouterr().err
