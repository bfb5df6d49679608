"""ISIC challenge sets (2016-2020) as downloaded: the year is recognised from its training
ground-truth file found below ``root`` (or chosen with ``year``); isic_years.py reads each year.

Official val/test parts are used where the download has them; the splits it lacks are carved
from training, stratified and grouped (lesion_id in 2018/2019, patient_id in 2020, the image
otherwise). Label sets: ``binary`` (melanoma vs rest) for every year, and each year's own
classes: ``3class`` (2017), ``dx`` (2018, HAM10000's seven) and ``dx8`` (2019).
The images are large JPEGs: set ``cache_dir`` so they are decoded and resized once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .base import BINARY_CLASSES, LesionDataModule
from .io import iter_files
from .isic_years import CLASSES_2017, CLASSES_2018, CLASSES_2019, YEARS, Part
from .layout import find_file, match_listed_images, require_root

log = logging.getLogger(__name__)

DOWNLOAD = "https://challenge.isic-archive.com/data/"
MAX_SEARCH_DEPTH = 4
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SUPERPIXELS_SUFFIX = "_superpixels"  # 2017's superpixel maps sit beside the images
#: a native label set belongs to one year
LABEL_SET_YEAR = {y.label_set: y.year for y in YEARS.values() if y.label_set}


class ISICDataModule(LesionDataModule):
    name = "isic"
    label_sets = {"binary": BINARY_CLASSES, **{y.label_set: list(y.classes) for y in YEARS.values() if y.label_set}}
    split_setting_keys = (*LesionDataModule.split_setting_keys, "year")

    def __init__(self, root, year: int | None = None, **kwargs):
        super().__init__(root, **kwargs)
        if year is not None and int(year) not in YEARS:
            raise ValueError(f"{self.name}: year must be one of {sorted(YEARS)} or null (recognised from the "
                             f"download), got {year!r}")
        implied = LABEL_SET_YEAR.get(self.label_set)
        if year is not None and implied is not None and int(year) != implied:
            raise ValueError(self._label_set_mismatch(int(year)))
        #: the year read; recognised from the download on setup when not given
        self.year = int(year) if year is not None else None

    def _label_set_mismatch(self, year: int) -> str:
        return (f"{self.name}: label_set {self.label_set!r} is the ISIC {LABEL_SET_YEAR[self.label_set]} classes, "
                f"but found ISIC {year}; use label_set=binary"
                + (f" or {YEARS[year].label_set}" if YEARS[year].label_set else "") + " for it")

    # --- which year ---------------------------------------------------------------------------
    def find_download(self) -> tuple[int, Path]:
        """(year, its training ground-truth file) below root."""
        require_root(self.root, self.name, "ISIC challenge download (a year's training ground-truth CSV "
                     "and image folder)", DOWNLOAD)
        wanted = [self.year] if self.year is not None else sorted(YEARS)
        found = {}
        for year in wanted:
            for anchor in YEARS[year].anchors:
                path = find_file(self.root, anchor, MAX_SEARCH_DEPTH)
                if path is not None and YEARS[year].accepts(path):
                    found[year] = path
                    break
        if not found:
            looked_for = ", ".join(a for y in wanted for a in YEARS[y].anchors)
            raise FileNotFoundError(
                f"{self.name}: no ISIC ground truth found under {self.root} (searched {MAX_SEARCH_DEPTH} levels) "
                f"for {'year ' + str(wanted[0]) if len(wanted) == 1 else 'any year'}: looked for {looked_for}. "
                f"Download the training images and ground truth from {DOWNLOAD} and set dataset.root there."
            )
        implied = LABEL_SET_YEAR.get(self.label_set)
        if implied is not None:  # a year's own label set picks that year
            if implied not in found:
                raise ValueError(self._label_set_mismatch(sorted(found)[0]))
            found = {implied: found[implied]}
        if len(found) > 1:
            listing = "; ".join(f"{y}: {p}" for y, p in found.items())
            raise FileNotFoundError(f"{self.name}: several ISIC years under {self.root} ({listing}); choose one with "
                                    f"dataset.year=<year> or point dataset.root at one of them")
        return next(iter(found.items()))

    # --- the table ----------------------------------------------------------------------------
    def part_table(self, part: Part) -> pd.DataFrame:
        """The rows of one part: its records matched to the image files in its folder."""
        index = {p.stem: str(p) for p in iter_files(part.folder, IMAGE_EXTENSIONS)
                 if not p.stem.endswith(SUPERPIXELS_SUFFIX)}
        records = part.records
        paths = match_listed_images(self.name, records["image"], index, part.csv, part.folder,
                                    "Re-extract the image zip of that part.")
        extra = len(index) - records["image"].nunique()
        if extra:
            log.info("%s: %d image(s) in %s are not listed in %s; ignored", self.name, extra, part.folder,
                     part.csv.name)
        if self.label_set == "binary":
            labels = records["melanoma"].astype(int)
        else:
            labels = records["dx"].map({c: i for i, c in enumerate(self.class_names)})
        meta = records.drop(columns=["image", "melanoma", "dx", "group"])
        return pd.DataFrame({"path": paths, "label": labels, "group": records["group"], "split": part.split}).join(meta)

    def build_table(self) -> pd.DataFrame:
        year, anchor = self.find_download()
        self.year = year
        parts = YEARS[year].read(anchor)
        log.info("%s: ISIC %d, parts %s", self.name, year,
                 ", ".join(f"{p.csv.name} ({p.split or 'training'})" for p in parts))
        return pd.concat([self.part_table(p) for p in parts], ignore_index=True)


__all__ = ["CLASSES_2017", "CLASSES_2018", "CLASSES_2019", "ISICDataModule"]
