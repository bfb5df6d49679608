"""HAM10000: ``HAM10000_metadata.csv`` and ``HAM10000_images_part_{1,2}/<image_id>.jpg``.

Several images often show the same lesion, so splits are grouped by ``lesion_id``: a random
image-level split puts 37% of test images (65% of melanomas) beside their own lesion in train.
"""

from __future__ import annotations


import pandas as pd

from .base import BINARY_CLASSES, LesionDataModule
from .io import iter_files
from .layout import match_listed_images, require_file, require_root, subdirs

DOWNLOAD = ("https://www.kaggle.com/datasets/kmader/skin-cancer-mnist-ham10000 "
            "(or the ISIC archive, https://doi.org/10.7910/DVN/DBW86T)")
METADATA = "HAM10000_metadata.csv"
DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
IMAGE_FOLDER_PREFIX = "ham10000_images"


class HAM10000DataModule(LesionDataModule):
    name = "ham10000"
    label_sets = {"binary": BINARY_CLASSES, "dx": list(DX)}

    def find_metadata(self):
        require_root(self.root, self.name, f"HAM10000 download ({METADATA} beside "
                     "HAM10000_images_part_1/ and _part_2/)", DOWNLOAD)
        return require_file(self.root, METADATA, self.name, DOWNLOAD)

    def read_metadata(self, csv) -> pd.DataFrame:
        meta = pd.read_csv(csv, dtype=str)
        missing = {"lesion_id", "image_id", "dx"} - set(meta.columns)
        if missing:
            raise ValueError(
                f"{csv}: columns {sorted(missing)} missing; expected lesion_id,image_id,dx,... "
                f"(found {list(meta.columns)})"
            )
        meta["dx"] = meta["dx"].fillna("").str.strip().str.lower()
        unknown = meta[~meta["dx"].isin(DX)]
        if len(unknown):
            # +2: the header is line 1 and pandas counts from 0
            rows = ", ".join(f"line {i + 2} ({r.image_id}: dx={r.dx!r})" for i, r in unknown.head(10).iterrows())
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ValueError(
                f"{csv}: {len(unknown)} row(s) with unknown dx: {rows}{more}. Expected one of "
                f"{', '.join(DX)}; fix or remove these rows."
            )
        for col in ("lesion_id", "image_id"):
            blank = meta[col].isna() | (meta[col].str.strip() == "")
            if blank.any():
                lines = ", ".join(str(i + 2) for i in meta.index[blank][:10])
                raise ValueError(f"{csv}: empty {col} on line(s) {lines}")
        return meta

    def image_index(self, folder) -> dict[str, str]:
        parts = [p for name, p in subdirs(folder).items() if name.startswith(IMAGE_FOLDER_PREFIX)]
        if not parts:
            raise FileNotFoundError(
                f"{self.name}: no image folders beside {METADATA} in {folder}: expected "
                f"HAM10000_images_part_1/ and HAM10000_images_part_2/ (any letter case). "
                f"Unpack both image zips of {DOWNLOAD} there."
            )
        index: dict[str, str] = {}
        for part in parts:
            for path in iter_files(part, (".jpg", ".jpeg", ".png")):
                # Some copies hold the same images twice (upper- and lower-case folders).
                index.setdefault(path.stem, str(path))
        return index

    def build_table(self) -> pd.DataFrame:
        csv = self.find_metadata()
        meta = self.read_metadata(csv)
        index = self.image_index(csv.parent)
        paths = match_listed_images(self.name, meta["image_id"], index, csv, "its image folders",
                                    "Re-extract both image zips.")
        if self.label_set == "binary":
            labels = (meta["dx"] == "mel").astype(int)
        else:
            labels = meta["dx"].map({d: i for i, d in enumerate(DX)})
        table = pd.DataFrame({"path": paths, "label": labels, "group": meta["lesion_id"].str.strip()})
        # patient metadata under the canonical names (melanoma.metadata); dx_type is never kept:
        # it gives the label away
        for own, field in (("age", "age"), ("sex", "sex"), ("localization", "site")):
            if own in meta.columns:
                table[field] = pd.to_numeric(meta[own], errors="coerce").to_numpy() if field == "age" else meta[own].to_numpy()
        return table


__all__ = ["DX", "HAM10000DataModule"]
