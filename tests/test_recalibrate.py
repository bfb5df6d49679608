"""Site recalibration: on a site with a planted colour cast, the home operating point misses
its sensitivity; the threshold refitted on a site sample reaches it on the held-out part; the
input checkpoint is left byte-identical and the new one names its sample."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from melanoma.cli import main
from melanoma.data.synthetic import write_dermmel_layout
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint
from melanoma.evaluation.operating_point import threshold_for_sensitivity
from melanoma.workflows.recalibrate import ORACLE, ORIGINAL, RECALIBRATED, positives_needed, site_sample
from melanoma.models.checkpoint import Calibration, read_meta
from melanoma.predict import Predictor
from melanoma.data.io import load_rgb
from melanoma.predict.predictor import eval_transform_of

KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
PER_CLASS = {"train": 50, "val": 25, "test": 25}  # 100 melanomas, 100 others


def _cast(src: Path, dst: Path) -> Path:
    """A copy of the DermMel tree with a warm, brighter colour cast (another camera / light)."""
    for p in src.rglob("*.jp*g"):
        q = dst / "DermMel" / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        Image.fromarray(np.clip(a * np.array([1.25, 0.9, 0.8]) + 30, 0, 255).astype(np.uint8)).save(q, quality=95)
    return dst / "DermMel"


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    home = write_dermmel_layout(tmp / "home", PER_CLASS, image_size=32, seed=7)
    site_root = _cast(home, tmp / "site")
    images = sorted(home.rglob("*.jp*g"))
    is_mel = np.array(["NotMelanoma" not in str(p) for p in images])
    # a model that ranks: a random tiny ViT with its linear head fitted on the home images
    torch.manual_seed(1)
    model = build_classifier("vit_tiny", KW, {"synthetic": ["not_melanoma", "melanoma"]}).eval()
    ckpt = tmp / "home.ckpt"
    save_classifier_checkpoint(ckpt, model, "vit_tiny", KW, image_size=32)
    tf = eval_transform_of(read_meta(ckpt).preprocessing)
    with torch.no_grad():
        feats = model.features(torch.stack([tf(load_rgb(p)) for p in images]))
    fc, y = model.heads["synthetic"].fc, torch.tensor(is_mel.astype(np.int64))
    opt = torch.optim.LBFGS(fc.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(fc(feats), y) + 1e-3 * fc.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    save_classifier_checkpoint(ckpt, model, "vit_tiny", KW, image_size=32)
    p = Predictor(ckpt, progress=False, announce=False)
    p_home = p.probabilities(p.logits_of_paths([str(q) for q in images]))[:, 1]
    home_t = threshold_for_sensitivity(p_home, is_mel, 0.95)["threshold"]  # the operating point chosen at home
    save_classifier_checkpoint(ckpt, model, "vit_tiny", KW, image_size=32, calibration={
        "synthetic": Calibration(1.0, threshold=home_t, target_sensitivity=0.95)})
    return {"tmp": tmp, "ckpt": ckpt, "site": site_root}


def _recalibrate(site, out_name, *extra):
    out = site["tmp"] / out_name
    rc = main(["recalibrate", str(site["ckpt"]), "dataset=dermmel", f"dataset.root={site['site']}",
               "dataset.num_workers=0", "--out", str(out), "--report", str(out.with_suffix("")), "-q", *extra])
    return rc, out


def test_recalibration_restores_the_target_sensitivity_and_leaves_the_input_alone(site):
    before = _sha(site["ckpt"])
    # the default sample (seed 0). The held-out sensitivity reached varies with the sample: over
    # seeds 0-39 of this fixture it averaged 0.943 (seed 3: 0.82, outside 0.95's interval), as
    # expected for a quantile of 50 melanomas checked on 50 others
    rc, out = _recalibrate(site, "site.ckpt", "--fraction", "0.5")
    assert rc == 0
    assert _sha(site["ckpt"]) == before  # byte-identical
    report = json.loads((out.with_suffix("") / "metrics.json").read_text())
    points = report["operating_points"]
    assert list(points) == [ORIGINAL, RECALIBRATED, ORACLE] and "optimistic" in ORACLE
    # the planted cast breaks the home operating point on the held-out part ...
    assert points[ORIGINAL]["sensitivity"] < 0.8
    assert points[ORIGINAL]["ci95"]["sensitivity"][1] < 0.95
    # ... and the recalibrated one reaches the target within its interval
    lo, hi = points[RECALIBRATED]["ci95"]["sensitivity"]
    assert lo <= 0.95 <= hi and points[RECALIBRATED]["sensitivity"] >= 0.8
    assert points[ORACLE]["sensitivity"] >= 0.95
    assert report["sample"]["melanomas"] >= positives_needed(0.95)
    assert report["sample"]["n"] + report["test_part"]["n"] == 200
    # the new checkpoint carries the fitted map, named after its sample
    cal = read_meta(out).heads["synthetic"].calibration
    assert cal.fitted_on["dataset"] == "dermmel" and cal.fitted_on["fingerprint"] == report["sample"]["fingerprint"]
    assert cal.fitted_on["split"] == "site sample" and cal.fitted_on["seed"] == 0
    assert cal.threshold == pytest.approx(points[RECALIBRATED]["threshold"])
    assert cal.precision == "32-true"  # the inference default, recorded with the map
    assert (out.with_suffix("") / "operating_points.png").is_file()
    # and predict, predict --uncalibrated and evaluate decide alike with it
    images = sorted(str(p) for p in site["site"].rglob("*.jp*g"))
    decisions = {}
    for flags in ([], ["--uncalibrated"]):
        csv_out = site["tmp"] / f"pred{len(flags)}.csv"
        assert main(["predict", str(out), *images, "--out", str(csv_out), "-q", *flags]) == 0
        decisions[tuple(flags)] = {r["path"]: r["decision"] for r in csv.DictReader(csv_out.open())}
    assert decisions[()] == decisions[("--uncalibrated",)]
    js = site["tmp"] / "pred.json"
    assert main(["predict", str(out), *images[:2], "--out", str(js), "-q"]) == 0
    assert json.loads(js.read_text())["calibration"]["fitted_on"]["fingerprint"] == report["sample"]["fingerprint"]
    ext = site["tmp"] / "ext"
    assert main(["evaluate", str(out), "dataset=dermmel", f"dataset.root={site['site']}", "dataset.num_workers=0",
                 "--external", "--out", str(ext), "-q"]) == 0
    with (ext / "predictions.csv").open() as f:
        assert {r["path"]: r["decision"] for r in csv.DictReader(f)} == decisions[()]


def test_a_sample_too_small_for_the_target_is_refused_with_the_numbers(site, capsys):
    before = _sha(site["ckpt"])
    rc, out = _recalibrate(site, "small.ckpt", "--fraction", "0.1")
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "holds 10 melanomas" in err and "needs at least 20" in err
    assert _sha(site["ckpt"]) == before


def test_writing_over_the_input_is_refused(site, capsys):
    rc = main(["recalibrate", str(site["ckpt"]), "dataset=dermmel", f"dataset.root={site['site']}",
               "--out", str(site["ckpt"]), "-q"])
    assert rc == 2 and "leaves the input untouched" in capsys.readouterr().err


def test_site_sample_is_stratified_and_keeps_groups_whole():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(300), rng.integers(1, 4, 300))
    is_mel = np.isin(groups, np.arange(0, 300, 5))  # every 5th lesion is a melanoma
    mask = site_sample(is_mel, groups, 0.3, seed=1)
    for g in np.unique(groups):
        assert len(set(mask[groups == g])) == 1  # a lesion is wholly in or out
    assert mask[is_mel].mean() == pytest.approx(0.3, abs=0.03)
    assert mask[~is_mel].mean() == pytest.approx(0.3, abs=0.03)
    assert (site_sample(is_mel, groups, 0.3, seed=1) == mask).all()
    assert not (site_sample(is_mel, groups, 0.3, seed=2) == mask).all()


def test_positives_needed():
    assert positives_needed(0.95) == 20 and positives_needed(0.9) == 10 and positives_needed(0.8) == 5
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        positives_needed(1.0)


def test_recalibrate_takes_a_precision_and_records_it(site):
    rc, out = _recalibrate(site, "bf16.ckpt", "--fraction", "0.5", "--precision", "bf16-mixed")
    assert rc == 0
    assert read_meta(out).heads["synthetic"].calibration.precision == "bf16-mixed"
