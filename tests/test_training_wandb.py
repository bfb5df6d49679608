"""W&B: offline without credentials/network, metrics and test figures in the offline run folder."""

import logging
import socket

import pytest

from melanoma.workflows.training_run import run
from melanoma.training import loggers
from helpers import compose_cfg, tiny_overrides


def test_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    mode, why = loggers.wandb_mode()
    assert mode == "offline" and "credentials" in why


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def test_mode_is_offline_when_host_unreachable(monkeypatch):
    """A real connection attempt: with credentials and WANDB_BASE_URL on the loopback, where no
    HTTPS server listens, the check is refused at once and the run goes offline."""
    if _port_open("127.0.0.1", 443):
        pytest.skip("something listens on 127.0.0.1:443 on this machine")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1")
    assert loggers.wandb_mode() == ("offline", "127.0.0.1 is not reachable")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.wandb_mode()[0] == "disabled"


def test_mode_is_online_when_the_configured_host_answers(monkeypatch):
    """The reachability check dials the host of WANDB_BASE_URL on 443 with a short timeout;
    when it connects (a fake socket here: no network in tests) the run is online."""
    dialled = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def create_connection(address, timeout=None):
        dialled.append((address, timeout))
        return Connection()

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert loggers.wandb_mode()[0] == "online"
    assert len(dialled) == 1 and dialled[0][0] == ("wandb.example.org", 443) and 0 < dialled[0][1] <= 2


@pytest.mark.slow
def test_offline_run_folder_holds_metrics_and_images(tiny_dermmel, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [o for o in tiny_overrides(tiny_dermmel, max_epochs=1) if o != "logger=csv"]
    cfg = compose_cfg([*overrides, "logger=default", "evaluate=true"], tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="melanoma"):
        run(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert any("wandb sync" in r.getMessage() and str(runs[0]) in r.getMessage() for r in caplog.records)
    log_files = list(runs[0].glob("run-*.wandb"))
    assert log_files
    blob = log_files[0].read_bytes()
    for key in (b"val/bal_acc", b"train/loss_step", b"lr/head", b"trainable_params", b"test/auroc",
                b"report/auroc", b"report/auroc_ci95_low"):
        assert key in blob, key
    # the one test report's figures reach the run
    images = sorted(p.name for p in (runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert any(n.startswith("confusion_matrix") for n in images), images
    assert any(n.startswith("confidence") for n in images), images
    # the run ended, so the next multirun job starts its own
    import wandb

    assert wandb.run is None
