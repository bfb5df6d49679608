"""Miniature ISIC challenge downloads (2016-2020) with the official file and column names.

Images are tiny noise JPEGs; what matters is the layout: ground-truth files, image folders,
superpixel PNGs (2017), ``_downsampled`` ids (2019), the duplicates list (2020), and one image
in a folder that its CSV does not list (2017, 2019).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SIZE = (32, 24)


def _image(path: Path, n: int, fmt: str = "JPEG") -> None:
    rng = np.random.default_rng(n)
    arr = rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt)


def _images(folder: Path, ids) -> None:
    for i in ids:
        _image(folder / f"{i}.jpg", int(i.split("_")[1]))


def _one_hot(ids, classes, columns) -> pd.DataFrame:
    return pd.DataFrame([[float(c == col) for col in columns] for c in classes], columns=columns).assign(
        image=list(ids))[["image", *columns]]


# --- 2016: no header, labels benign/malignant (training) and 0.0/1.0 (test) ------------------
ISIC2016 = {"train": 20, "test": 10}  # melanoma: every 4th training image, every 3rd test image


def write_isic2016(root: Path) -> Path:
    train = [f"ISIC_{i:07d}" for i in range(ISIC2016["train"])]
    test = [f"ISIC_{100 + i:07d}" for i in range(ISIC2016["test"])]
    _images(root / "ISBI2016_ISIC_Part3_Training_Data", train)
    _images(root / "ISBI2016_ISIC_Part3_Test_Data", test)
    (root / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv").write_text(
        "".join(f"{i},{'malignant' if k % 4 == 0 else 'benign'}\n" for k, i in enumerate(train)))
    (root / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv").write_text(
        "".join(f"{i},{1.0 if k % 3 == 0 else 0.0}\n" for k, i in enumerate(test)))
    return root


# --- 2017: Training/Validation/Test_v2, superpixels beside every image -------------------------
ISIC2017 = {"Training": 18, "Validation": 6, "Test_v2": 9}  # cycle melanoma, seb. keratosis, nevus
ISIC2017_EXTRA = "ISIC_0099999"  # in the training folder, not in the CSV


def write_isic2017(root: Path) -> Path:
    start = 0
    for part, n in ISIC2017.items():
        ids = [f"ISIC_{start + k:07d}" for k in range(n)]
        start += 1000
        folder = root / f"ISIC-2017_{part}_Data"
        _images(folder, ids)
        for i in ids:
            _image(folder / f"{i}_superpixels.png", int(i.split("_")[1]) + 7, "PNG")
        pd.DataFrame({"image_id": ids, "age_approximate": 50, "sex": "female"}).to_csv(
            folder / f"ISIC-2017_{part}_Data_metadata.csv", index=False)
        pd.DataFrame({"image_id": ids, "melanoma": [float(k % 3 == 0) for k in range(n)],
                      "seborrheic_keratosis": [float(k % 3 == 1) for k in range(n)]}).to_csv(
            root / f"ISIC-2017_{part}_Part3_GroundTruth.csv", index=False)
    _images(root / "ISIC-2017_Training_Data", [ISIC2017_EXTRA])
    return root


# --- 2018 Task 3: HAM10000 ids, one-hot ground truth, lesion groupings -----------------------
ISIC2018_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ISIC2018_LESIONS = {"MEL": 4, "NV": 8, "BCC": 2, "AKIEC": 2, "BKL": 2, "DF": 2, "VASC": 2}  # 1-3 images each
ISIC2018_FIRST_ID = 24306  # HAM10000's first image id, as in the real download


def isic2018_training() -> pd.DataFrame:
    rows, n, lesion = [], ISIC2018_FIRST_ID, 0
    for dx, lesions in ISIC2018_LESIONS.items():
        for _ in range(lesions):
            for _ in range(1 + lesion % 3):
                rows.append((f"ISIC_{n:07d}", f"HAM_{lesion:07d}", dx))
                n += 1
            lesion += 1
    return pd.DataFrame(rows, columns=["image", "lesion_id", "dx"])


def write_isic2018(root: Path, validation: bool = True) -> Path:
    train = isic2018_training()
    _images(root / "ISIC2018_Task3_Training_Input", train.image)
    gt_dir = root / "ISIC2018_Task3_Training_GroundTruth"
    gt_dir.mkdir(parents=True)
    _one_hot(train.image, train.dx, ISIC2018_COLUMNS).to_csv(gt_dir / f"{gt_dir.name}.csv", index=False)
    train.assign(diagnosis_confirm_type="histopathology")[["image", "lesion_id", "diagnosis_confirm_type"]].to_csv(
        root / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    (root / "ISIC2018_Task3_Training_Input" / "ATTRIBUTION.txt").write_text("HAM10000\n")
    if validation:
        ids = [f"ISIC_{34321 + k:07d}" for k in range(len(ISIC2018_COLUMNS))]
        _images(root / "ISIC2018_Task3_Validation_Input", ids)
        gt_dir = root / "ISIC2018_Task3_Validation_GroundTruth"
        gt_dir.mkdir()
        _one_hot(ids, ISIC2018_COLUMNS, ISIC2018_COLUMNS).to_csv(gt_dir / f"{gt_dir.name}.csv", index=False)
    return root


# --- 2019: one-hot with SCC and UNK, metadata with lesion_id, _downsampled ids ---------------
ISIC2019_COLUMNS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC2019_LESIONS = {"MEL": 6, "NV": 10, "BCC": 3, "AK": 2, "BKL": 3, "DF": 2, "VASC": 2, "SCC": 2}
ISIC2019_EXTRA = "ISIC_0077777"


def isic2019_training() -> pd.DataFrame:
    """Every third lesion has no lesion_id (its images are their own groups); the first
    images carry the ``_downsampled`` suffix, as about 2,000 real ones do."""
    rows, n, lesion = [], 0, 0
    sites = ["anterior torso", "head/neck", "lower extremity", None]
    for dx, lesions in ISIC2019_LESIONS.items():
        for _ in range(lesions):
            lesion_id = None if lesion % 3 == 2 else f"{'HAM' if lesion % 2 else 'BCN'}_{lesion:07d}"
            for _ in range(1 + lesion % 2):
                image = f"ISIC_{n:07d}" + ("_downsampled" if n < 5 else "")
                rows.append((image, lesion_id, dx, [35.0, 60.0, None][n % 3], ["male", "female", None][n % 3],
                             sites[n % 4]))
                n += 1
            lesion += 1
    return pd.DataFrame(rows, columns=["image", "lesion_id", "dx", "age_approx", "sex", "anatom_site_general"])


def write_isic2019(root: Path) -> Path:
    train = isic2019_training()
    _images(root / "ISIC_2019_Training_Input", [*train.image, ISIC2019_EXTRA])
    _one_hot(train.image, train.dx, ISIC2019_COLUMNS).to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    train[["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]].to_csv(
        root / "ISIC_2019_Training_Metadata.csv", index=False)
    return root


# --- 2020: patients, binary target, duplicates list ------------------------------------------
ISIC2020_PATIENTS = 12  # 3 or 4 images each; the first image of every 3rd patient is melanoma
ISIC2020_DUPLICATES = [("ISIC_2000001", "ISIC_2000002"), ("ISIC_2000011", "ISIC_2000012")]


def isic2020_training() -> pd.DataFrame:
    rows, n = [], 2000000
    for p in range(ISIC2020_PATIENTS):
        for k in range(3 + p % 2):
            mel = p % 3 == 0 and k == 0
            rows.append({"image_name": f"ISIC_{n:07d}", "patient_id": f"IP_{p:07d}", "sex": ["male", "female"][p % 2],
                         "age_approx": 30.0 + 5 * p, "anatom_site_general_challenge": "torso",
                         "diagnosis": "melanoma" if mel else "nevus",
                         "benign_malignant": "malignant" if mel else "benign", "target": int(mel)})
            n += 1
    return pd.DataFrame(rows)


def write_isic2020(root: Path, layout: str = "official") -> Path:
    """``official``: ISIC_2020_Training_JPEG/train/ + ISIC_2020_Training_GroundTruth.csv (v2,
    with lesion_id) + ISIC_2020_Training_Duplicates.csv; ``kaggle``: train/ + train.csv."""
    train = isic2020_training()
    if layout == "official":
        _images(root / "ISIC_2020_Training_JPEG" / "train", train.image_name)
        train.assign(lesion_id=[f"IL_{k:07d}" for k in range(len(train))]).to_csv(
            root / "ISIC_2020_Training_GroundTruth.csv", index=False)
        pd.DataFrame(ISIC2020_DUPLICATES, columns=["image_name_1", "image_name_2"]).to_csv(
            root / "ISIC_2020_Training_Duplicates.csv", index=False)
    else:
        _images(root / "train", train.image_name)
        train.to_csv(root / "train.csv", index=False)
    return root
