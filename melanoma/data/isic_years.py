"""The ISIC challenge downloads, one reader per year: ground-truth files to records.

A reader gets the year's training ground-truth file (the anchor that identified the year) and
returns the parts of the download it finds: for each, the official split (None for training,
whose val/test are carved by the DataModule), the ground-truth file, the image folder, and
records with columns image, melanoma (bool), dx (the year's native class, or None), group and,
where the year has them, the metadata columns age, sex, site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .ham10000 import DX
from .layout import find_dir, find_file

log = logging.getLogger(__name__)

#: the metadata columns, named the same for every year
METADATA_COLUMNS = ("age", "sex", "site")
CLASSES_2017 = ["melanoma", "seborrheic_keratosis", "nevus"]
CLASSES_2018 = list(DX)  # ISIC 2018 Task 3 is HAM10000: the same seven diagnoses
CLASSES_2019 = ["ak", "bcc", "bkl", "df", "mel", "nv", "scc", "vasc"]
#: how far below the training ground truth the other files of a download are looked for
PART_SEARCH_DEPTH = 2


@dataclass(frozen=True)
class Part:
    split: str | None
    csv: Path
    folder: Path
    records: pd.DataFrame


@dataclass(frozen=True)
class Year:
    year: int
    anchors: tuple[str, ...]  # training ground-truth file names that identify the year
    read: Callable[[Path], list[Part]]
    label_set: str | None = None  # the native label set (besides binary)
    classes: tuple[str, ...] = ()
    accepts: Callable[[Path], bool] = lambda path: True


# --- shared checks ------------------------------------------------------------------------
def _lines(index, limit: int = 10) -> str:
    more = f" and {len(index) - limit} more" if len(index) > limit else ""
    return ", ".join(str(i) for i in list(index)[:limit]) + more


def _read_csv(csv: Path, required: Sequence[str]) -> pd.DataFrame:
    table = pd.read_csv(csv, dtype=str)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(f"{csv}: columns {missing} missing; expected {','.join(required)},... "
                         f"(found {list(table.columns)}). Is this the unmodified challenge file?")
    return table


# Line numbers in messages: +2 because the header is line 1 and pandas counts rows from 0.
def _numbers(table: pd.DataFrame, columns: Sequence[str], csv: Path) -> np.ndarray:
    values = table[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy()
    bad = ~np.isin(values, (0.0, 1.0)).all(axis=1)
    if bad.any():
        raise ValueError(f"{csv}: values other than 0/1 in columns {','.join(columns)} on line(s) "
                         f"{_lines(table.index[bad] + 2)}")
    return values


def _one_hot(table: pd.DataFrame, id_col: str, columns: Sequence[str], csv: Path) -> pd.Series:
    """The column set on each row (lower-cased); every row must have exactly one."""
    values = _numbers(table, columns, csv)
    bad = values.sum(axis=1) != 1
    if bad.any():
        rows = ", ".join(f"line {i + 2} ({table[id_col][i]})" for i in table.index[bad][:10])
        raise ValueError(f"{csv}: {int(bad.sum())} row(s) without exactly one of {','.join(columns)} set: {rows}")
    return pd.Series([columns[k].lower() for k in values.argmax(axis=1)], index=table.index)


def _folder(base: Path, name: str, csv: Path) -> Path:
    folder = find_dir(base, name, PART_SEARCH_DEPTH)
    if folder is None:
        raise FileNotFoundError(f"image folder {name}/ not found under {base} (where {csv.name} is); unzip the "
                                f"images that come with {csv.name} there")
    return folder


def _parts(base: Path, specs, read: Callable[[Path], pd.DataFrame]) -> list[Part]:
    """specs: (split, ground-truth file, image folder); parts whose file is absent are skipped."""
    parts = []
    for split, gt_name, folder_name in specs:
        csv = find_file(base, gt_name, PART_SEARCH_DEPTH)
        if csv is not None:
            parts.append(Part(split, csv, _folder(base, folder_name, csv), read(csv)))
    return parts


def _records(image, melanoma, dx=None, group=None, **metadata) -> pd.DataFrame:
    image = pd.Series(image).str.strip().reset_index(drop=True)
    group = image if group is None else pd.Series(group).reset_index(drop=True).fillna(image)
    records = pd.DataFrame({"image": image, "melanoma": np.asarray(melanoma, dtype=bool),
                            "dx": None if dx is None else np.asarray(dx, dtype=object), "group": group})
    for col, values in metadata.items():
        records[col] = np.asarray(values)
    return records


# --- 2016 -----------------------------------------------------------------------------------
LABELS_2016 = {"benign": False, "malignant": True, "0": False, "1": True, "0.0": False, "1.0": True}


def _read_2016(csv: Path) -> pd.DataFrame:
    table = pd.read_csv(csv, header=None, names=["image", "label"], dtype=str)
    label = table["label"].fillna("").str.strip().str.lower()
    bad = ~label.isin(list(LABELS_2016))
    if bad.any():
        rows = ", ".join(f"line {i + 1} ({table.image[i]}: {table.label[i]!r})" for i in table.index[bad][:10])
        raise ValueError(f"{csv}: {int(bad.sum())} row(s) with an unknown label: {rows}; expected "
                         f"benign/malignant or 0/1 (the file has no header line)")
    return _records(table["image"], label.map(LABELS_2016))


def read_2016(anchor: Path) -> list[Part]:
    return _parts(anchor.parent, [
        (None, "ISBI2016_ISIC_Part3_Training_GroundTruth.csv", "ISBI2016_ISIC_Part3_Training_Data"),
        ("test", "ISBI2016_ISIC_Part3_Test_GroundTruth.csv", "ISBI2016_ISIC_Part3_Test_Data"),
    ], _read_2016)


# --- 2017 -----------------------------------------------------------------------------------
def _read_2017(csv: Path) -> pd.DataFrame:
    table = _read_csv(csv, ["image_id", "melanoma", "seborrheic_keratosis"])
    mel, sk = _numbers(table, ["melanoma", "seborrheic_keratosis"], csv).T.astype(bool)
    both = mel & sk
    if both.any():
        raise ValueError(f"{csv}: melanoma and seborrheic_keratosis both 1 on line(s) {_lines(table.index[both] + 2)}")
    dx = np.where(mel, "melanoma", np.where(sk, "seborrheic_keratosis", "nevus"))
    return _records(table["image_id"], mel, dx)


METADATA_2017 = {"age_approximate": "age", "sex": "sex"}  # <Data folder>/<its name>_metadata.csv


def read_2017(anchor: Path) -> list[Part]:
    parts = _parts(anchor.parent, [
        (None, "ISIC-2017_Training_Part3_GroundTruth.csv", "ISIC-2017_Training_Data"),
        ("val", "ISIC-2017_Validation_Part3_GroundTruth.csv", "ISIC-2017_Validation_Data"),
        ("test", "ISIC-2017_Test_v2_Part3_GroundTruth.csv", "ISIC-2017_Test_v2_Data"),
    ], _read_2017)
    for part in parts:
        meta_csv = part.folder / f"{part.folder.name}_metadata.csv"
        if meta_csv.is_file():
            meta = _read_csv(meta_csv, ["image_id", *METADATA_2017]).drop_duplicates("image_id").set_index("image_id")
            for old, new in METADATA_2017.items():
                part.records[new] = part.records["image"].map(meta[old])
            part.records["age"] = pd.to_numeric(part.records["age"], errors="coerce")  # "unknown" -> NaN
    return parts


# --- 2018 Task 3 ----------------------------------------------------------------------------
COLUMNS_2018 = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
GROUPINGS_2018 = "ISIC2018_Task3_Training_LesionGroupings.csv"


def _read_2018(csv: Path) -> pd.DataFrame:
    table = _read_csv(csv, ["image", *COLUMNS_2018])
    dx = _one_hot(table, "image", COLUMNS_2018, csv)
    return _records(table["image"], dx == "mel", dx)


def read_2018(anchor: Path) -> list[Part]:
    # the ground truth sits in a folder of its own name: the download is one level up
    base = anchor.parent.parent if anchor.parent.name.lower() == anchor.stem.lower() else anchor.parent
    parts = _parts(base, [
        (None, "ISIC2018_Task3_Training_GroundTruth.csv", "ISIC2018_Task3_Training_Input"),
        ("val", "ISIC2018_Task3_Validation_GroundTruth.csv", "ISIC2018_Task3_Validation_Input"),
        ("test", "ISIC2018_Task3_Test_GroundTruth.csv", "ISIC2018_Task3_Test_Input"),
    ], _read_2018)
    groupings = find_file(base, GROUPINGS_2018, PART_SEARCH_DEPTH)
    if groupings is None:
        log.warning("ISIC 2018: %s not found under %s: each training image is its own group, so images of one "
                    "lesion can land in different splits. Download it to split by lesion.", GROUPINGS_2018, base)
        return parts
    lesions = _read_csv(groupings, ["image", "lesion_id"]).drop_duplicates("image").set_index("image")["lesion_id"]
    train = parts[0].records
    train["group"] = train["image"].map(lesions).fillna(train["image"])
    return parts


# --- 2019 -----------------------------------------------------------------------------------
COLUMNS_2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
METADATA_2019 = "ISIC_2019_Training_Metadata.csv"


def read_2019(anchor: Path) -> list[Part]:
    base = anchor.parent
    table = _read_csv(anchor, ["image", *COLUMNS_2019])
    dx = _one_hot(table, "image", COLUMNS_2019, anchor)
    unknown = dx == "unk"
    if unknown.any():
        raise ValueError(f"{anchor}: UNK set on line(s) {_lines(table.index[unknown] + 2)}; the training set has "
                         f"no unknown class to learn. Remove these rows.")
    meta_csv = find_file(base, METADATA_2019, PART_SEARCH_DEPTH)
    if meta_csv is None:
        raise FileNotFoundError(f"ISIC 2019: {METADATA_2019} not found under {base}; its lesion_id column is "
                                f"what keeps images of one lesion in one split. Download it beside {anchor.name}.")
    meta = _read_csv(meta_csv, ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"])
    meta = meta.drop_duplicates("image")  # a repeated row must not repeat the image
    meta = table[["image"]].merge(meta, on="image", how="left")
    records = _records(table["image"], dx == "mel", dx, meta["lesion_id"],
                       age=pd.to_numeric(meta["age_approx"]), sex=meta["sex"], site=meta["anatom_site_general"])
    return [Part(None, anchor, _folder(base, "ISIC_2019_Training_Input", anchor), records)]


# --- 2020 -----------------------------------------------------------------------------------
COLUMNS_2020 = ["image_name", "patient_id", "target"]
DUPLICATES_2020 = "ISIC_2020_Training_Duplicates.csv"
IMAGE_FOLDERS_2020 = ("ISIC_2020_Training_JPEG/train", "jpeg/train", "train")  # official, Kaggle


def is_2020_ground_truth(path: Path) -> bool:
    # train.csv is a common name: only the one with the 2020 columns counts
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().strip().split(",")
    return all(c in header for c in COLUMNS_2020)


def read_2020(anchor: Path) -> list[Part]:
    base = anchor.parent
    table = _read_csv(anchor, COLUMNS_2020)
    duplicates_csv = find_file(base, DUPLICATES_2020, PART_SEARCH_DEPTH)
    if duplicates_csv is not None:
        second = set(_read_csv(duplicates_csv, ["image_name_1", "image_name_2"])["image_name_2"].str.strip())
        drop = table["image_name"].str.strip().isin(second)
        log.info("ISIC 2020: dropped %d image(s) listed second in %s", int(drop.sum()), duplicates_csv.name)
        table = table[~drop].reset_index(drop=True)
    target = _numbers(table, ["target"], anchor)[:, 0].astype(bool)
    sources = ("age_approx", "sex", "anatom_site_general_challenge")
    meta = {new: table[old] for new, old in zip(METADATA_COLUMNS, sources) if old in table}
    if "age" in meta:
        meta["age"] = pd.to_numeric(meta["age"])
    folder = next((base / f for f in IMAGE_FOLDERS_2020 if (base / f).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"ISIC 2020: no JPEG folder beside {anchor}: expected one of "
                                f"{', '.join(f + '/' for f in IMAGE_FOLDERS_2020)}")
    group = table["patient_id"].where(table["patient_id"].str.strip() != "")
    return [Part(None, anchor, folder, _records(table["image_name"], target, None, group, **meta))]


YEARS = {y.year: y for y in (
    Year(2016, ("ISBI2016_ISIC_Part3_Training_GroundTruth.csv",), read_2016),
    Year(2017, ("ISIC-2017_Training_Part3_GroundTruth.csv",), read_2017, "3class", tuple(CLASSES_2017)),
    Year(2018, ("ISIC2018_Task3_Training_GroundTruth.csv",), read_2018, "dx", tuple(CLASSES_2018)),
    Year(2019, ("ISIC_2019_Training_GroundTruth.csv",), read_2019, "dx8", tuple(CLASSES_2019)),
    Year(2020, ("ISIC_2020_Training_GroundTruth.csv", "train.csv"), read_2020, accepts=is_2020_ground_truth),
)}
