"""A quiet console: the report printed last (after the loggers' summaries), Lightning's
uncalibrated test table not beside it, each message once, loader workers capped at the CPUs,
known-harmless third-party noise filtered, numbers rounded for reading (files keep them)."""

import csv
import io
import logging
import sys
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule

import melanoma.workflows.training_run as train_module
from melanoma.cli import STDOUT_DIGITS, main
from melanoma.data import base
from melanoma.training.callbacks import ParameterSummary
from melanoma.training.noise import RANK_ZERO_LOGGER, quiet_third_party
from helpers import SYNTHETIC, compose_cfg, lesion_bytes, tiny_checkpoint, tiny_overrides


@pytest.mark.slow
def test_training_console_report_last_no_test_table_messages_once(tiny_dermmel, tmp_path, capsys, caplog, monkeypatch):
    finished = []

    def fake_finish():  # stands in for W&B's run summary, printed when the run ends
        finished.append(True)
        print("LOGGER SUMMARY")

    monkeypatch.setattr(train_module, "finish_wandb", fake_finish)
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=1), "evaluate=true", "print_report=true",
                       "callbacks.model_summary={_target_:melanoma.training.callbacks.ParameterSummary,max_depth:1}"],
                      tmp_path / "run")
    with caplog.at_level(logging.INFO):
        train_module.run(cfg)
    out = capsys.readouterr().out
    assert finished and out.index("LOGGER SUMMARY") < out.index("Test report (dermmel;")
    assert out.rstrip().splitlines()[-1].lstrip().startswith("ece_melanoma_after_calibration")  # the report is last
    assert "Test metric" not in out and "DataLoader 0" not in out  # Lightning's uncalibrated table
    log = caplog.text
    assert "test loop metrics (argmax, uncalibrated) written to" in log
    assert log.count("calibration: chose") == 1 and "temperature scaling" not in log
    assert "tensor(" not in log
    summary = [r.getMessage() for r in caplog.records if "Params" in r.getMessage()]
    assert summary and "ModuleDict" not in summary[0] and "Classifier" in summary[0]


def test_num_workers_capped_at_available_cpus_with_one_line(monkeypatch, caplog, tmp_path):
    from melanoma.data.dermmel import DermMelDataModule

    monkeypatch.setattr(base, "available_cpus", lambda: 2)
    monkeypatch.setattr(base, "_capped", set())
    with caplog.at_level(logging.INFO, logger="melanoma.data.base"):
        a = DermMelDataModule(tmp_path, num_workers=4)
        b = DermMelDataModule(tmp_path, num_workers=4)
        c = DermMelDataModule(tmp_path, num_workers=1)
    assert (a.num_workers, b.num_workers, c.num_workers) == (2, 2, 1)
    lines = [r.getMessage() for r in caplog.records if "num_workers" in r.getMessage()]
    assert lines == ["dataset.num_workers=4 but this machine gives the process 2 CPU(s): using 2 loader workers"]


def test_known_harmless_third_party_messages_are_filtered(caplog):
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter, not two
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()  # re-applied inside the catch (which resets the filters)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("Precision bf16-mixed is not supported by the model summary.", UserWarning)
        warnings.warn("something else entirely", UserWarning)
    assert [str(w.message) for w in caught] == ["something else entirely"]
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        logger.info("💡 Tip: For seamless cloud logging ... install litlogger")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_model_summary_lists_only_modules_with_parameters():
    class M(LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.metrics = torch.nn.ModuleDict({"acc": torch.nn.Identity()})

    class FakeTrainer:
        strategy = None

    summary = ParameterSummary(max_depth=1)._summary(FakeTrainer(), M())
    assert summary.layer_names == ["lin"] and summary.total_parameters == 8


def test_predict_rounds_on_a_terminal_and_keeps_full_precision_in_files_and_pipes(tmp_path, capsys, caplog,
                                                                                 monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "t.ckpt", {"synthetic": SYNTHETIC})
    image = tmp_path / "a.jpg"
    image.write_bytes(lesion_bytes(0))
    assert main(["predict", str(ckpt), str(image), "-q"]) == 0  # a pipe: full precision
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(row["prob_melanoma"].split(".")[1]) > STDOUT_DIGITS
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal
    with caplog.at_level(logging.WARNING):
        assert main(["predict", str(ckpt), str(image), "-q"]) == 0
    captured = capsys.readouterr()
    (row,) = list(csv.DictReader(io.StringIO(captured.out)))
    decimals = [len(row[k].split(".")[1]) for k in ("prob_melanoma", "melanoma_probability")]
    assert max(decimals) <= STDOUT_DIGITS
    # the uncalibrated-head warning is printed once (not also logged by the predictor)
    assert captured.err.count("this head is uncalibrated") == 1, captured.err
    assert not [r for r in caplog.records if "uncalibrated" in r.getMessage()]
    assert main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    (row,) = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(row["prob_melanoma"].split(".")[1]) > STDOUT_DIGITS
