"""PH2: ``PH2_dataset.txt`` (a ``||``-delimited table, legend lines after it) and images in the
official layout (``PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp``) or a flat
``images/IMDxxx.jpg`` beside the table. Labels come from Clinical Diagnosis (0 common nevus,
1 atypical nevus, 2 melanoma); Histological Diagnosis is mostly empty and is not used.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .base import BINARY_CLASSES, LesionDataModule
from .layout import require_file, require_root, subdirs

DOWNLOAD = "https://www.fc.up.pt/addi/ph2%20database.html"
TABLE = "PH2_dataset.txt"
CLASSES_3 = ["common_nevus", "atypical_nevus", "melanoma"]
OFFICIAL_FOLDERS = ("ph2 dataset images", "ph2_dataset_images", "ph2datasetimages")
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("||")]


def parse_ph2_table(path: str | os.PathLike) -> pd.DataFrame:
    """Rows of the table as (name, clinical_diagnosis int). Lines before the header and after
    the table (the legends) are ignored."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    header_at = next((i for i, l in enumerate(lines) if l.strip().startswith("||")), None)
    if header_at is None:
        raise ValueError(f"{path}: no '||'-delimited table found; is this PH2_dataset.txt?")
    header = [h.lower() for h in _cells(lines[header_at])]
    try:
        name_col, dx_col = header.index("name"), header.index("clinical diagnosis")
    except ValueError:
        raise ValueError(f"{path}: table header lacks 'Name' or 'Clinical Diagnosis': {header}") from None
    rows = []
    for lineno, line in enumerate(lines[header_at + 1:], start=header_at + 2):
        if not line.strip().startswith("||"):
            if rows:
                break  # the legends follow the table
            continue
        cells = _cells(line)
        name, dx = cells[name_col], cells[dx_col] if dx_col < len(cells) else ""
        if dx not in ("0", "1", "2"):
            raise ValueError(
                f"{path} line {lineno}: Clinical Diagnosis of {name!r} is {dx!r}; expected 0, 1 or 2"
            )
        rows.append((name, int(dx)))
    table = pd.DataFrame(rows, columns=["name", "clinical_diagnosis"])
    dup = table["name"][table["name"].duplicated()]
    if len(dup):
        raise ValueError(f"{path}: images listed twice: {', '.join(dup.head(10))}")
    return table


def _first_image(folder: Path, stem: str) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return str(candidate)
    return None


class PH2DataModule(LesionDataModule):
    name = "ph2"
    label_sets = {"3class": CLASSES_3, "binary": BINARY_CLASSES}

    def __init__(self, root, label_set: str = "3class", val_fraction: float = 0.2,
                 test_fraction: float = 0.2, **kwargs):
        super().__init__(root, label_set=label_set, val_fraction=val_fraction,
                         test_fraction=test_fraction, **kwargs)

    def find_table(self) -> Path:
        require_root(self.root, self.name, f"PH2 download ({TABLE} beside 'PH2 Dataset images/')",
                     DOWNLOAD)
        return require_file(self.root, TABLE, self.name, DOWNLOAD)

    def locate_images(self, folder: Path, names) -> list[str | None]:
        dirs = subdirs(folder)
        official = next((dirs[n] for n in OFFICIAL_FOLDERS if n in dirs), None)
        flat = dirs.get("images")
        if official is None and flat is None:
            raise FileNotFoundError(
                f"{self.name}: no image folder beside {folder / TABLE}: expected 'PH2 Dataset "
                f"images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp' (official) or "
                f"'images/IMDxxx.jpg' (flat)."
            )
        found = []
        for n in names:
            path = None
            if official is not None:
                path = _first_image(official / n / f"{n}_Dermoscopic_Image", n)
            if path is None and flat is not None:
                path = _first_image(flat, n)
            found.append(path)
        return found

    def build_table(self) -> pd.DataFrame:
        table_path = self.find_table()
        table = parse_ph2_table(table_path)
        paths = self.locate_images(table_path.parent, table["name"])
        missing = [n for n, p in zip(table["name"], paths) if p is None]
        if missing:
            raise FileNotFoundError(
                f"{self.name}: {len(missing)} of {len(table)} images listed in {table_path} were "
                f"not found, e.g. {', '.join(missing[:5])}"
            )
        dx = table["clinical_diagnosis"]
        labels = dx if self.label_set == "3class" else (dx == 2).astype(int)
        return pd.DataFrame({"path": paths, "label": labels, "group": table["name"]})
