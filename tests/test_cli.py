"""The command line's one error path (featuredb.cli.FeaturedbGroup): every command answers a usage
error, a FeaturedbError, a file-system error and Ctrl-C with one line on stderr and a non-zero exit."""

from __future__ import annotations

import errno

import pytest
from click.testing import CliRunner

from featuredb import cli
from featuredb.cli import main
from featuredb.errors import StoreError

COMMANDS = sorted(main.commands)


def one_line_error(result, code: int) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output and "Usage:" not in result.stderr


def test_every_command_is_registered():
    assert set(COMMANDS) == {"index", "describe", "demo", "search", "show", "fires", "find", "steer", "similar", "serve",
                             "export", "import", "coders", "upgrade", "map"}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_usage_error_is_one_line_and_exit_2(command):
    one_line_error(CliRunner().invoke(main, [command, "--no-such-option"]), 2)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_works(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_unknown_command_is_one_line():
    one_line_error(CliRunner().invoke(main, ["no-such-command"]), 2)


@pytest.mark.parametrize("raised, code, message", [
    (StoreError("the catalogue is odd"), 1, "error: the catalogue is odd"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/db"), 1, "error: No space left on device: /data/db"),
    (KeyboardInterrupt(), 130, "interrupted (rerun with --resume to continue)"),
])
def test_errors_from_inside_a_command_are_one_line(monkeypatch, tmp_path, raised, code, message):
    def run_index(config):
        raise raised

    import featuredb.indexer.run

    monkeypatch.setattr(featuredb.indexer.run, "run_index", run_index)
    result = CliRunner().invoke(main, ["index", "-m", "x", "-c", "y", "--corpus", "z", "--db", str(tmp_path / "db")])
    assert result.exit_code == code
    assert result.stderr == message + "\n"


def test_a_bug_is_not_hidden_as_user_error(monkeypatch, tmp_path):
    """Anything else is a bug: it propagates (a traceback), it is not dressed up as bad input."""
    def run_index(config):
        raise ZeroDivisionError("bug")

    import featuredb.indexer.run

    monkeypatch.setattr(featuredb.indexer.run, "run_index", run_index)
    result = CliRunner().invoke(main, ["index", "-m", "x", "-c", "y", "--corpus", "z", "--db", str(tmp_path / "db")])
    assert isinstance(result.exception, ZeroDivisionError)
    assert cli.RESUME_HINTS["index"].startswith("interrupted")


def test_bare_featuredb_prints_the_help():
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 0 and "Commands:" in result.output and not result.stderr
