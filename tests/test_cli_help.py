"""`melanoma --help` and each subcommand's help: a description, defaults shown, `%` printed once,
`--version`, and `melanoma train` pointing to `python train.py`."""

import subprocess
import sys

import pytest

import melanoma
from melanoma.cli import build_parser, main

SUBCOMMANDS = ["predict", "evaluate", "summarize", "recalibrate", "check-data", "export", "serve"]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_a_description_and_no_literal_double_percent(capsys, command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert sub.description and len(sub.description) > 40, command
    text = _help(capsys, command)
    assert "%%" not in text
    assert sub.description.split()[0] in text


def test_evaluate_help_shows_defaults_and_percent_once(capsys):
    text = " ".join(_help(capsys, "evaluate").split())  # argparse wraps lines
    assert "95% bootstrap" in text and "%%" not in text
    assert "(default: 0.95)" in text  # --target-sensitivity
    assert "--device DEVICE cpu or cuda[:N] (default: cpu)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_defaults_are_shown_for_options_with_one(capsys):
    text = " ".join(_help(capsys, "predict").split())
    assert "images per forward pass (default: 32)" in text
    text = " ".join(_help(capsys, "recalibrate").split())
    assert "(default: 0.2)" in text and "(default: 0)" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"melanoma {melanoma.__version__}"


def test_melanoma_train_points_to_train_py(capsys):
    assert main(["train", "dataset=ham10000"]) == 2
    err = capsys.readouterr().err
    assert "python train.py" in err and "invalid choice" not in err


def test_console_script_help_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "melanoma.cli", "evaluate", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "%%" not in out.stdout and "95%" in out.stdout


def test_readme_says_how_to_install_cpu_only_torch_and_what_the_default_weighs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    install = text[text.index("## Install"):text.index("## Quick start")]
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in install
    assert "6.4 GB" in install and "nvidia" in install.lower()
    # the two set-up commands stay as they are
    assert "pip install -e . && python train.py experiment=quickstart" in text
    assert 'pip install -e ".[test]" && pytest' in text
