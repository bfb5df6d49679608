"""Nothing a model has seen is scored as external: a small model trained on real HAM10000 images
is evaluated --external (and recalibrated) on DermMel- and ISIC-2019-layout sets that mix renamed,
transformed copies of its own images with images it never saw; init_from moves what the
backbone saw out of the new val/test split."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import compose_cfg, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides, tiny_checkpoint
from PIL import Image, ImageEnhance, ImageOps

from melanoma.cli import main
from melanoma.models.checkpoint import read_meta
from melanoma.workflows.training_run import run

COPY = {  # what a copy goes through on its way into another dataset
    "renamed": lambda im: im,
    "resized": lambda im: im.resize((im.width * 2, im.height * 2)),
    "flipped": ImageOps.mirror,
    "rotated": lambda im: im.rotate(90, expand=True),
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "all": lambda im: ImageEnhance.Brightness(ImageOps.flip(im.rotate(270, expand=True)).resize((300, 400))).enhance(0.9),
}


@pytest.fixture(scope="module")
def ham(ham10000_root, tmp_path_factory):
    """80 real HAM10000 lesions (all their images) in the official layout, and the metadata of
    other lesions' images (never in it)."""
    meta = pd.read_csv(ham10000_root / "HAM10000_metadata.csv")
    rng = np.random.default_rng(0)
    mel = meta[meta.dx == "mel"].lesion_id.unique()
    other = meta[meta.dx != "mel"].lesion_id.unique()
    chosen = set(rng.choice(mel, 30, replace=False)) | set(rng.choice(other, 50, replace=False))
    files = {p.stem: p for p in ham10000_root.glob("HAM10000_images_part_*/*.jpg")}
    root = tmp_path_factory.mktemp("ham_real") / "HAM10000"
    (root / "HAM10000_images_part_1").mkdir(parents=True)
    (root / "HAM10000_images_part_2").mkdir()
    inside = meta[meta.lesion_id.isin(chosen)]
    for i in inside.image_id:
        shutil.copy(files[i], root / "HAM10000_images_part_1" / f"{i}.jpg")
    inside.to_csv(root / "HAM10000_metadata.csv", index=False)
    outside = meta[~meta.lesion_id.isin(chosen)].drop_duplicates("lesion_id")
    outside = pd.concat([outside[outside.dx == "mel"].head(30), outside[outside.dx != "mel"].head(30)])
    return root, files, outside


@pytest.fixture(scope="module")
def trained(ham, tmp_path_factory):
    root, _, _ = ham
    out = tmp_path_factory.mktemp("seen_run") / "run"
    overrides = ["dataset=ham10000", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(root),
                 *tiny_model_overrides(), *tiny_trainer_overrides(max_epochs=1), "dataset.seed=3"]
    run(compose_cfg(overrides, out))
    ckpt = out / "checkpoints" / "last.ckpt"
    return ckpt, pd.read_csv(out / "splits.csv")


def _stem(p):
    return os.path.splitext(os.path.basename(str(p)))[0]


def test_the_checkpoint_records_every_split_compactly(trained):
    ckpt, splits = trained
    meta = read_meta(ckpt)
    assert meta.model_id and {(r.split, r.head) for r in meta.seen} == {(s, "ham10000") for s in ("train", "val", "test")}
    for r in meta.seen:
        assert sorted(r.ids) == sorted(splits.path[splits.split == r.split].map(_stem))
        assert r.hashes.shape == (len(r.ids), 18) and r.model == meta.model_id
    ckpt_bytes = sum(len(r.to_dict()["ids"]) + r.hashes.nbytes for r in meta.seen)
    assert ckpt_bytes / len(splits) < 30  # a few bytes per image: 25,000 images well under 1 MB


def _dermmel_site(ham, splits, tmp, n_copies_each=2):
    """DermMel layout: AUG_* copies of the model's train and val images (every COPY kind) and
    images of lesions it never saw, with their true labels."""
    _, files, outside = ham
    seen = splits[splits.split.isin(["train", "val"])]
    copies, new = [], []
    k = 0
    for kind, f in COPY.items():
        for _, row in seen.sample(n_copies_each, random_state=len(copies)).iterrows():
            label = "Melanoma" if row.label == "melanoma" else "NotMelanoma"
            dst = tmp / "DermMel" / "test" / label / f"AUG_0_{k}.jpeg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            f(Image.open(row.path).convert("RGB")).save(dst, quality=90)
            copies.append(str(dst))
            k += 1
    for split in ("train_sep", "valid", "test"):
        for label in ("Melanoma", "NotMelanoma"):
            (tmp / "DermMel" / split / label).mkdir(parents=True, exist_ok=True)
    for j, (_, row) in enumerate(outside.iterrows()):
        label = "Melanoma" if row.dx == "mel" else "NotMelanoma"
        dst = tmp / "DermMel" / ("train_sep", "valid")[j % 2] / label / f"{k}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[row.image_id], dst)
        new.append(str(dst))
        k += 1
    return tmp, copies, new


def test_external_excludes_renamed_transformed_copies_and_keeps_every_new_image(ham, trained, tmp_path, capsys):
    ckpt, splits = trained
    root, copies, new = _dermmel_site(ham, splits, tmp_path / "site")
    out = tmp_path / "report"
    assert main(["evaluate", str(ckpt), "dataset=dermmel", f"dataset.root={root}", "--external", "--out", str(out),
                 "-q"]) == 0
    scored = set(pd.read_csv(out / "predictions.csv").path)
    assert scored == set(new)  # no copy scored, every new image scored
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(new)
    ov = metrics["overlap"]
    assert ov["checked"] and ov["n_seen"] == len(copies) and ov["by_match"] == {"id": 0, "content": len(copies)}
    assert set(ov["by_split"]) <= {"train", "val"} and not ov["kept"]
    excluded = pd.read_csv(out / "excluded.csv")
    assert sorted(excluded.path) == sorted(copies)
    assert (excluded.match == "content").all() and (excluded.distance <= 16).all()
    assert set(excluded.matched_image) <= set(splits.path.map(_stem))
    assert f"{len(copies)} of {len(copies) + len(new)} images the model has seen" in capsys.readouterr().out

    kept = tmp_path / "kept"
    assert main(["evaluate", str(ckpt), "dataset=dermmel", f"dataset.root={root}", "--external", "--out", str(kept),
                 "--keep-overlap", "-q"]) == 0
    metrics = json.loads((kept / "metrics.json").read_text())
    assert set(pd.read_csv(kept / "predictions.csv").path) == set(new) | set(copies)
    assert metrics["overlap"]["kept"] and "not those of an external test set" in metrics["overlap"]["warning"]


def test_isic_ids_match_by_name_too(ham, trained, tmp_path):
    """ISIC 2019 holds HAM10000 under the same ids: those are excluded by id (also the test split's)."""
    ckpt, splits = trained
    _, files, outside = ham
    root = tmp_path / "isic2019"
    (root / "ISIC_2019_Training_Input").mkdir(parents=True)
    ours = splits.sample(12, random_state=1)
    rows = []
    for _, r in ours.iterrows():  # the same image, re-encoded smaller: ISIC's own copy
        Image.open(r.path).resize((100, 75)).save(root / "ISIC_2019_Training_Input" / f"{_stem(r.path)}.jpg", quality=80)
        rows.append((_stem(r.path), r.label == "melanoma"))
    for _, r in outside.iterrows():
        shutil.copy(files[r.image_id], root / "ISIC_2019_Training_Input" / f"{r.image_id}.jpg")
        rows.append((r.image_id, r.dx == "mel"))
    cols = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    gt = pd.DataFrame([{"image": i, **{c: float(c == ("MEL" if m else "NV")) for c in cols}} for i, m in rows])
    gt.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": [i for i, _ in rows], "age_approx": 50.0, "anatom_site_general": "torso",
                  "lesion_id": [f"IL_{k:07d}" for k in range(len(rows))], "sex": "male"}).to_csv(
        root / "ISIC_2019_Training_Metadata.csv", index=False)
    out = tmp_path / "report"
    assert main(["evaluate", str(ckpt), "dataset=isic", f"dataset.root={root}", "--external", "--out", str(out), "-q"]) == 0
    ov = json.loads((out / "metrics.json").read_text())["overlap"]
    assert ov["n_seen"] == 12 and ov["by_match"]["id"] == 12
    assert ov["by_split"] == {k: int(v) for k, v in ours.split.value_counts().items()}
    assert set(pd.read_csv(out / "predictions.csv").path.map(_stem)) == set(outside.image_id)


def test_recalibrate_fits_and_reports_without_seen_images(ham, trained, tmp_path):
    ckpt, splits = trained
    root, copies, new = _dermmel_site(ham, splits, tmp_path / "site")
    out = tmp_path / "site.ckpt"
    assert main(["recalibrate", str(ckpt), "dataset=dermmel", f"dataset.root={root}", "--fraction", "0.5",
                 "--target-sensitivity", "0.8", "--out", str(out), "--report", str(tmp_path / "rep"), "-q"]) == 0
    report = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert report["overlap"]["n_seen"] == len(copies)
    assert report["sample"]["n"] + report["test_part"]["n"] == len(new)
    reported = set(pd.read_csv(tmp_path / "rep" / "predictions.csv").path)
    assert reported <= set(new) and not reported & set(copies)
    site = [r for r in read_meta(out).seen if r.split == "site sample"]
    assert len(site) == 1 and len(site[0].ids) == report["sample"]["n"]
    assert not set(site[0].ids) & set(map(_stem, reported))  # the sample is not the test part


def test_a_checkpoint_without_a_seen_set_still_evaluates_and_says_it_cannot_check(ham, trained, tmp_path, caplog):
    ckpt, splits = trained
    root, copies, new = _dermmel_site(ham, splits, tmp_path / "site")
    old = tiny_checkpoint(tmp_path / "old.ckpt", {"ham10000": ["not_melanoma", "melanoma"]})
    assert read_meta(old).seen is None
    out = tmp_path / "report"
    assert main(["evaluate", str(old), "dataset=dermmel", f"dataset.root={root}", "--external", "--out", str(out), "-q"]) == 0
    ov = json.loads((out / "metrics.json").read_text())["overlap"]
    assert ov["checked"] is False and "no seen-set" in ov["reason"]
    assert len(pd.read_csv(out / "predictions.csv")) == len(copies) + len(new)


def test_init_from_moves_what_the_backbone_saw_out_of_val_and_test(ham, trained, tmp_path):
    ckpt, first = trained
    root, _, _ = ham
    out = tmp_path / "run2"
    overrides = ["dataset=ham10000", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(root),
                 *tiny_model_overrides(), *tiny_trainer_overrides(max_epochs=1), "dataset.seed=11",
                 f"model.init_from={ckpt}"]
    run(compose_cfg(overrides, out))
    second = pd.read_csv(out / "splits.csv")
    seen_before = set(first.path[first.split.isin(["train", "val"])].map(_stem))
    held_now = set(second.path[second.split.isin(["val", "test"])].map(_stem))
    assert not held_now & seen_before  # nothing the backbone trained or calibrated on is tested
    assert held_now  # and some images are still held out (those of the first run's test split)
    meta = read_meta(out / "checkpoints" / "last.ckpt")
    data = meta.heads["ham10000"].data
    assert data.moved_to_train and set(map(_stem, data.moved_to_train)) <= seen_before
    # the lineage's records travel, under the first model's id; evaluate rebuilds the same split
    assert {r.model for r in meta.seen} == {read_meta(ckpt).model_id, meta.model_id}
    rep = tmp_path / "rep"
    assert main(["evaluate", str(out / "checkpoints" / "last.ckpt"), "--out", str(rep), "-q"]) == 0
    assert set(pd.read_csv(rep / "predictions.csv").path.map(_stem)) == set(second.path[second.split == "test"].map(_stem))
