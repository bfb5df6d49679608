"""`evaluate --external` with mapped classes: the argmax metrics are the head's own argmax mapped
to melanoma vs rest (not p(melanoma) >= 0.5), and the stored map's calibration error on the new
site is reported with intervals."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import HAM, tiny_checkpoint

from melanoma.cli import main


@pytest.fixture(scope="module")
def mel_leaning_ham_head(tmp_path_factory):
    """An untrained 7-class HAM10000 head whose 'mel' logit is 0.5 above the others: its argmax
    is mel on nearly every image while p(mel) stays near 0.2, where the two rules disagree."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("ham_head") / "m.ckpt", {"ham10000": HAM})
    ckpt = torch.load(path, weights_only=True)
    w, b = ckpt["state_dict"]["model.heads.ham10000.fc.weight"], ckpt["state_dict"]["model.heads.ham10000.fc.bias"]
    w.mul_(0.01)
    b.zero_()[HAM.index("mel")] = 0.5
    torch.save(ckpt, path)
    return path


def test_mapped_argmax_metrics_are_the_heads_own_argmax(mel_leaning_ham_head, dermmel_root, tmp_path):
    out = tmp_path / "ext"
    assert main(["evaluate", str(mel_leaning_ham_head), "dataset=dermmel", f"dataset.root={dermmel_root}",
                 "dataset.num_workers=0", "--external", "--out", str(out), "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions.csv")
    assert metrics["labels_mapped_to_melanoma_vs_rest"]
    logits = table[[f"logit_{c}" for c in HAM]].to_numpy()
    called = logits.argmax(1) == HAM.index("mel")
    is_mel = (table["true_label"] == "melanoma").to_numpy()
    assert called.mean() > 0.5 and (table["melanoma_probability"] < 0.5).all()  # the rules disagree here
    assert metrics["sensitivity_argmax"] == pytest.approx(called[is_mel].mean())
    assert metrics["specificity_argmax"] == pytest.approx((~called[~is_mel]).mean())
    assert metrics["accuracy"] == pytest.approx(np.mean(called == is_mel))
    assert metrics["balanced_accuracy"] == pytest.approx((called[is_mel].mean() + (~called[~is_mel]).mean()) / 2)
    lo, hi = metrics["ci95"]["sensitivity_argmax"]
    assert lo <= metrics["sensitivity_argmax"] <= hi and hi > 0  # the interval belongs to the same rule
    assert list(table["predicted_label"] == "melanoma") == list(called)
    # the stored map's calibration error on the site, with intervals: what recalibration is judged against
    for key in ("ece", "ece_melanoma"):
        assert 0 <= metrics[key] <= 1 and len(metrics["ci95"][key]) == 2
