"""The command line's contract: documented exit codes, one error line, every handler importable."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from lssupervisor.cli.main import HANDLERS, build_parser, main
from lssupervisor.errors import ExitCode


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["status", "--bogus"], ["stamp"], ["stamp", "three"], []],
    ids=["unknown-command", "unknown-option", "missing-argument", "bad-type", "no-command"],
)
def test_a_bad_command_line_exits_ex_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == ExitCode.USAGE == 64
    err = capsys.readouterr().err
    assert "error:" in err and "usage:" in err


def test_every_subcommand_has_an_importable_handler() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == set(HANDLERS)  # type: ignore[attr-defined]
    for command, target in HANDLERS.items():
        module_name, func = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), func)), command


def test_an_expected_failure_is_one_line_with_its_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lssupervisor.yaml"
    config.write_text("lightningstream:\n  stop_timeout: ten\n")
    assert main(["check", "-c", str(config)]) == ExitCode.CONFIG
    assert main(["status", "-c", str(tmp_path / "missing.yaml")]) == ExitCode.CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lssupervisor: error: {tmp_path / 'missing.yaml'}: no such file "
                   f"(create one with `lssupervisor init DIR ...`); no state file at "
                   f"{tmp_path / 'state' / 'state.json'} either (the default state_dir (state next to "
                   "missing.yaml)); pass --state-dir DIR if the daemon keeps its state elsewhere"]


def test_config_reference_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out.startswith("# Configuration reference")
