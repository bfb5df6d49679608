"""Miniature HAM10000 and PH2 downloads in their real on-disk layouts, for the tests.

Only tests need these writers (the built-in synthetic dataset writes the DermMel layout, which
stays in melanoma/data/synthetic.py). Images come from the same lesion renderer, drawn from
their own seed sequence per image id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from melanoma.data.ham10000 import DX
from melanoma.data.ph2 import parse_ph2_table
from melanoma.data.synthetic import _image_rng, _render_rect

# images per class per split for the nested DermMel download: tiny, but every split has both classes
DERMMEL_COUNTS = {"train": {"Melanoma": 6, "NotMelanoma": 10}, "val": 3, "test": 4}

# lesions per dx: every class present, melanoma and nevus the largest as in the real data
HAM_LESIONS = {"akiec": 3, "bcc": 3, "bkl": 4, "df": 3, "mel": 10, "nv": 24, "vasc": 3}


def write_ham10000_layout(
    root: str | os.PathLike,
    lesions_per_dx: Mapping[str, int],
    images_per_lesion: tuple[int, int] = (1, 3),
    image_size: tuple[int, int] = (40, 30),
    seed: int = 0,
    lowercase: bool = False,
    extra_rows: list[dict] | None = None,
) -> Path:
    """Write ``HAM10000_metadata.csv`` and images split over ``HAM10000_images_part_{1,2}/``
    (lower-case folder names when ``lowercase``). Lesion ``k`` gets between
    ``images_per_lesion`` images. ``extra_rows`` are appended to the metadata verbatim (for
    testing bad rows). Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    w, h = image_size
    rows = []
    image_no = 24306
    lesion_no = 0
    for d, dx in enumerate(DX):
        for _ in range(int(lesions_per_dx.get(dx, 0))):
            lesion_id = f"HAM_{lesion_no:07d}"
            lesion_no += 1
            for _ in range(int(rng.integers(images_per_lesion[0], images_per_lesion[1] + 1))):
                rows.append({"lesion_id": lesion_id, "image_id": f"ISIC_{image_no:07d}", "dx": dx,
                             "dx_type": "histo", "age": 50.0, "sex": "male", "localization": "back"})
                image_no += 1
    order = rng.permutation(len(rows))  # the real CSV is sorted by lesion, not by image id
    rows = [rows[i] for i in order]
    half = 24306 + (image_no - 24306) // 2
    parts = ["HAM10000_images_part_1", "HAM10000_images_part_2"]
    if lowercase:
        parts = [p.lower() for p in parts]
    for p in parts:
        (root / p).mkdir(parents=True, exist_ok=True)
    for row in rows:
        n = int(row["image_id"].split("_")[1])
        img, _ = _render_rect(_image_rng(seed, n), row["dx"] == "mel", w, h)
        Image.fromarray(img).save(root / parts[n >= half] / f"{row['image_id']}.jpg", quality=90)
    meta = pd.DataFrame(rows + list(extra_rows or []))
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


def write_ph2_layout(
    root: str | os.PathLike,
    table_path: str | os.PathLike,
    per_class: int | None = None,
    layout: str = "official",
    image_size: tuple[int, int] = (40, 30),
    seed: int = 0,
    masks: bool = True,
) -> Path:
    """Write a PH2 folder from a real ``PH2_dataset.txt``: the table (restricted to the first
    ``per_class`` images of each Clinical Diagnosis, legend kept) and generated images, either in
    the official layout (``PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` and
    ``IMDxxx_lesion/IMDxxx_lesion.bmp``) or the flat one (``images/IMDxxx.jpg``). Returns root."""
    if layout not in ("official", "flat"):
        raise ValueError(f"layout must be 'official' or 'flat', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = parse_ph2_table(table_path)
    if per_class is not None:
        table = table.groupby("clinical_diagnosis", sort=False).head(per_class)
    keep = set(table["name"])
    lines = Path(table_path).read_text(encoding="utf-8", errors="replace").splitlines()
    out_lines, header_seen = [], False
    for line in lines:
        if line.strip().startswith("||"):
            name = line.strip().strip("|").split("||")[0].strip()
            if not header_seen:
                header_seen = True
            elif name not in keep:
                continue
        out_lines.append(line)
    (root / "PH2_dataset.txt").write_text("\n".join(out_lines) + "\n", encoding="utf-8")
    w, h = image_size
    for name, dx in zip(table["name"], table["clinical_diagnosis"]):
        img, mask = _render_rect(_image_rng(seed, int(name[3:])), dx == 2, w, h)
        if layout == "official":
            folder = root / "PH2 Dataset images" / name
            (folder / f"{name}_Dermoscopic_Image").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
            if masks:
                (folder / f"{name}_lesion").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}_lesion" / f"{name}_lesion.bmp")
        else:
            (root / "images").mkdir(exist_ok=True)
            Image.fromarray(img).save(root / "images" / f"{name}.jpg", quality=90)
    return root
