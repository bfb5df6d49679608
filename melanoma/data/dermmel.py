"""DermMel (Kaggle drscarlat/melanoma): ``DermMel/{train_sep,valid,test}/{Melanoma,NotMelanoma}``.

Downloads often nest the folder (``melanoma/dermmel/DermMel``), so it is searched for under the
given root. Note: its melanoma images are augmented copies of HAM10000 melanomas, so accuracy
measured on it flatters a model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .base import BINARY_CLASSES, LesionDataModule
from .io import iter_files
from .layout import require_root, subdirs

DOWNLOAD = "https://www.kaggle.com/datasets/drscarlat/melanoma"
SPLIT_FOLDERS = {"train": ("train_sep", "train"), "val": ("valid", "val", "validation"), "test": ("test",)}
CLASS_FOLDERS = {"notmelanoma": 0, "melanoma": 1}  # label = index in BINARY_CLASSES
EXTENSIONS = (".jpg", ".jpeg")
MAX_SEARCH_DEPTH = 4


def _split_dirs(folder: Path) -> dict[str, Path] | None:
    children = subdirs(folder)
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        match = next((children[n] for n in names if n in children), None)
        if match is None:
            return None
        found[split] = match
    return found


class DermMelDataModule(LesionDataModule):
    name = "dermmel"
    label_sets = {"binary": BINARY_CLASSES}
    has_official_split = True

    def find_dermmel(self, root: Path | None = None) -> Path:
        """The folder holding the split folders: ``root`` itself or one below it (a folder
        named DermMel is preferred)."""
        root = Path(root or self.root)
        require_root(root, self.name, "DermMel download (a DermMel/ folder with train_sep/, valid/, "
                     "test/, each holding Melanoma/ and NotMelanoma/)", DOWNLOAD)
        queue, candidates = [(root, 0)], []
        while queue:
            folder, depth = queue.pop(0)
            if _split_dirs(folder) is not None:
                candidates.append(folder)
                continue
            if depth < MAX_SEARCH_DEPTH:
                queue.extend((child, depth + 1) for child in sorted(subdirs(folder).values()))
        if not candidates:
            raise FileNotFoundError(
                f"{self.name}: no DermMel folder found under {root} (searched {MAX_SEARCH_DEPTH} "
                f"levels): expected a folder with train_sep/, valid/ and test/ subfolders, each "
                f"holding Melanoma/ and NotMelanoma/. Download it from {DOWNLOAD}."
            )
        named = [c for c in candidates if c.name.lower() == "dermmel"]
        return (named or candidates)[0]

    def table_from(self, dermmel: Path) -> pd.DataFrame:
        rows = []
        for split, split_dir in _split_dirs(dermmel).items():
            classes = subdirs(split_dir)
            unknown = sorted(set(classes) - set(CLASS_FOLDERS))
            missing = sorted(set(CLASS_FOLDERS) - set(classes))
            if unknown or missing:
                raise FileNotFoundError(
                    f"{self.name}: {split_dir} should hold exactly the class folders Melanoma/ and "
                    f"NotMelanoma/; missing {missing or 'none'}, unexpected {unknown or 'none'}"
                )
            for cls, label in CLASS_FOLDERS.items():
                for path in iter_files(classes[cls], EXTENSIONS):
                    group = f"{split_dir.name}/{classes[cls].name}/{path.stem}"
                    rows.append((str(path), label, group, split))
        table = pd.DataFrame(rows, columns=["path", "label", "group", "split"])
        empty = [s for s in SPLIT_FOLDERS if not (table["split"] == s).any()]
        if empty:
            raise FileNotFoundError(
                f"{self.name}: no .jpg/.jpeg images in the {empty} split(s) under {dermmel}"
            )
        return table

    def build_table(self) -> pd.DataFrame:
        return self.table_from(self.find_dermmel())
