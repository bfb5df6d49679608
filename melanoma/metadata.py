"""Patient metadata beside the image: which fields, how each is encoded, what is refused.

One schema for every dataset and every path (training loaders, predict, ONNX, serve): the fields
``age``, ``sex`` and ``site`` under their canonical names, each dataset's own column names mapped
to them (HAM10000 ``localization``, ISIC ``age_approx`` / ``anatom_site_general``...), and an
encoding that never drops an image and never imputes silently: every field has an explicit
"missing" indicator. The schema is a plain dict in the checkpoint (a head's spec), so a checkpoint
alone encodes metadata the way its training did.

Encoding, in field order:
- age: ``age / AGE_SCALE`` (0 when missing) and an ``age_missing`` indicator
- sex: one-hot over ``SEX_VALUES`` and ``sex_missing``
- site: one-hot over ``SITE_VALUES`` (ISIC 2020's coarse anatomic sites, which every dataset's
  finer sites map onto) and ``site_missing``
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["FIELDS", "FUSIONS", "LEAKING", "MetadataSchema", "parse_fields"]

#: the canonical fields, in encoding order
FIELDS = ("age", "sex", "site")
#: model.fusion values; "none" trains on the image alone
FUSIONS = ("none", "concat", "metablock")
#: ages are divided by this (a fixed constant, not fitted: the same encoding on every dataset)
AGE_SCALE = 100.0
SEX_VALUES = ("female", "male")
SITE_VALUES = ("head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital")

#: each dataset's own column names for the canonical fields
ALIASES = {
    "age": "age", "age_approx": "age", "age_approximate": "age",
    "sex": "sex", "gender": "sex",
    "site": "site", "localization": "site", "anatom_site_general": "site",
    "anatom_site_general_challenge": "site", "anatom_site": "site",
}

#: columns that give the label away or only describe how a dataset was collected: refused, with why
LEAKING = {
    "dx_type": "HAM10000's dx_type says how the diagnosis was confirmed (histopathology, follow-up, consensus, "
               "confocal); melanomas are confirmed by histopathology, so it gives the label away",
    "dx": "dx is the diagnosis itself (the label)",
    "diagnosis": "diagnosis is the label itself",
    "benign_malignant": "benign_malignant is the label itself",
    "target": "target is the label itself",
    "melanoma": "melanoma is the label itself",
    "diagnosis_confirm_type": "the way a diagnosis was confirmed gives the label away (melanomas are biopsied)",
    "patient_id": "patient ids (and images per patient) describe how the dataset was collected, not the lesion",
    "lesion_id": "lesion ids (and images per lesion) describe how the dataset was collected, not the lesion",
    "images_per_patient": "images per patient is an artefact of how the dataset was collected, not clinical signal",
    "file_size": "file size is an artefact of how the dataset was collected, not clinical signal",
}

#: every dataset's site names on the coarse vocabulary (lower case); "unknown" is missing
SITE_MAP = {
    "head/neck": "head/neck", "face": "head/neck", "scalp": "head/neck", "ear": "head/neck", "neck": "head/neck",
    "upper extremity": "upper extremity", "hand": "upper extremity",
    "lower extremity": "lower extremity", "foot": "lower extremity",
    "torso": "torso", "trunk": "torso", "abdomen": "torso", "back": "torso", "chest": "torso",
    "anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso",
    "palms/soles": "palms/soles", "acral": "palms/soles",
    "oral/genital": "oral/genital", "genital": "oral/genital",
}
SEX_MAP = {"female": "female", "f": "female", "male": "male", "m": "male"}
#: spellings that mean "not recorded"
MISSING_WORDS = {"", "unknown", "nan", "none", "na", "n/a", "?"}


def parse_fields(value) -> tuple[str, ...]:
    """``dataset.metadata`` (a list of field names, or None / empty for none) as canonical fields.

    A dataset's own column name is accepted for its field (``localization`` for ``site``); a column
    that leaks the label is refused saying why; anything else is refused naming the fields."""
    if value is None or value is False:
        return ()
    if isinstance(value, str):
        value = [v for v in value.strip("[] ").split(",") if v.strip()]
    fields: list[str] = []
    for raw in value:
        name = str(raw).strip().lower()
        if name in LEAKING:
            raise ValueError(f"dataset.metadata: {name!r} is refused: {LEAKING[name]}. Use some of {list(FIELDS)}.")
        if name not in ALIASES:
            raise ValueError(f"dataset.metadata: unknown field {name!r}; expected some of {list(FIELDS)} "
                             f"(or a dataset's own name for one: {sorted(set(ALIASES) - set(FIELDS))})")
        field = ALIASES[name]
        if field in fields:
            raise ValueError(f"dataset.metadata names {field!r} twice (as {list(value)})")
        fields.append(field)
    return tuple(f for f in FIELDS if f in fields)  # encoding order is fixed, whatever the config's


def _missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return str(v).strip().lower() in MISSING_WORDS


class MetadataSchema:
    """Fields and their encoding; ``to_dict`` is what checkpoints, sidecars and the API record."""

    def __init__(self, fields: Iterable[str]):
        self.fields = parse_fields(list(fields))
        if not self.fields:
            raise ValueError("a metadata schema needs at least one field")

    # --- the record -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        enc = {}
        if "age" in self.fields:
            enc["age"] = {"encoding": "scaled", "scale": AGE_SCALE, "missing_indicator": True}
        if "sex" in self.fields:
            enc["sex"] = {"encoding": "one-hot", "values": list(SEX_VALUES), "missing_indicator": True}
        if "site" in self.fields:
            enc["site"] = {"encoding": "one-hot", "values": list(SITE_VALUES), "missing_indicator": True,
                           "aliases": dict(SITE_MAP)}
        return {"fields": list(self.fields), "encodings": enc, "columns": self.columns()}

    @classmethod
    def from_dict(cls, d: Mapping) -> MetadataSchema:
        schema = cls(d["fields"])
        if list(d.get("columns", schema.columns())) != schema.columns():
            raise ValueError(f"metadata schema columns {d.get('columns')} differ from this version's "
                             f"{schema.columns()}: the checkpoint was written with another encoding")
        return schema

    def columns(self) -> list[str]:
        """Names of the encoded vector's entries, in order."""
        cols: list[str] = []
        if "age" in self.fields:
            cols += ["age", "age_missing"]
        if "sex" in self.fields:
            cols += [f"sex={v}" for v in SEX_VALUES] + ["sex_missing"]
        if "site" in self.fields:
            cols += [f"site={v}" for v in SITE_VALUES] + ["site_missing"]
        return cols

    @property
    def size(self) -> int:
        return len(self.columns())

    def __eq__(self, other) -> bool:
        return isinstance(other, MetadataSchema) and self.fields == other.fields

    def __repr__(self) -> str:
        return f"MetadataSchema({list(self.fields)})"

    # --- encoding -------------------------------------------------------------------------------
    def encode_value(self, field: str, value) -> tuple[list[float], bool]:
        """(the field's entries, whether it counts as missing). An unreadable value is an error."""
        if field == "age":
            if _missing(value):
                return [0.0, 1.0], True
            try:
                age = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"age {value!r} is not a number; expected years (e.g. 45) or empty for missing") from None
            if not math.isfinite(age) or age < 0 or age > 130:
                raise ValueError(f"age {value!r} is outside 0-130 years; fix it or leave it empty for missing")
            return [age / AGE_SCALE, 0.0], False
        values, mapping = (SEX_VALUES, SEX_MAP) if field == "sex" else (SITE_VALUES, SITE_MAP)
        if _missing(value):
            return [0.0] * len(values) + [1.0], True
        key = str(value).strip().lower()
        if key not in mapping:
            raise ValueError(f"{field} {value!r} is not a known value; expected one of {sorted(mapping)} "
                             f"(or empty / 'unknown' for missing)")
        one = [1.0 if v == mapping[key] else 0.0 for v in values]
        return one + [0.0], False

    def encode_row(self, row: Mapping) -> tuple[np.ndarray, list[str]]:
        """One record (field -> value; absent fields are missing) as (vector, missing fields)."""
        vec, missing = [], []
        for f in self.fields:
            part, absent = self.encode_value(f, row.get(f))
            vec += part
            if absent:
                missing.append(f)
        return np.asarray(vec, dtype=np.float32), missing

    def encode(self, rows: Sequence[Mapping] | None, n: int | None = None) -> np.ndarray:
        """(N, size) float32 vectors of records; ``rows`` None: ``n`` all-missing vectors."""
        if rows is None:
            return np.repeat(self.missing_vector()[None], int(n or 0), axis=0)
        return np.stack([self.encode_row(r)[0] for r in rows]) if len(rows) else np.zeros((0, self.size), np.float32)

    def encode_table(self, table) -> np.ndarray:
        """A DataFrame with (some of) the canonical columns; a column it lacks is missing throughout."""
        records = [{f: (row.get(f) if f in table.columns else None) for f in self.fields}
                   for row in table.to_dict("records")]
        return self.encode(records)

    def missing_vector(self) -> np.ndarray:
        return self.encode_row({})[0]

    def missing_counts(self, vectors: np.ndarray) -> dict[str, int]:
        """Per field, how many of these encoded vectors have it missing."""
        cols = self.columns()
        return {f: int(vectors[:, cols.index(f"{f}_missing")].sum()) for f in self.fields}


def read_metadata_table(path, images: Sequence, fields: Sequence[str]) -> tuple[list[dict | None], list[str]]:
    """Per image, its record from a CSV table (``melanoma predict --metadata table.csv``): a column
    ``image`` holding the file name or path, and a column per field (canonical or a dataset's own
    name). Returns (records in ``images`` order, None where the table has no row; notes to show).
    An image matches a row by its path, else by its file name; a file name listed twice is an
    error. Columns that are neither ``image`` nor a field are ignored and named in the notes."""
    import os

    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "image" not in table.columns:
        raise ValueError(f"{path}: no column 'image' (found {list(table.columns)}); expected a column image with each "
                         f"file's name or path, plus a column per field {list(fields)}")
    rename, ignored = {}, []
    for col in table.columns:
        key = col.strip().lower()
        if col == "image":
            continue
        if ALIASES.get(key) in fields and ALIASES[key] not in rename.values():
            rename[col] = ALIASES[key]
        else:
            ignored.append(col + (f" ({LEAKING[key]})" if key in LEAKING else ""))
    table = table.rename(columns=rename)
    notes = []
    if ignored:
        notes.append(f"{path}: columns not used: {', '.join(ignored)}")
    absent = [f for f in fields if f not in table.columns]
    if absent:
        notes.append(f"{path}: no column for {absent}: those values are scored as missing for every image")
    by_path, by_name = {}, {}
    for row in table.to_dict("records"):
        image = str(row["image"]).strip()
        record = {f: row.get(f) for f in fields}
        by_path[os.path.normpath(os.path.abspath(image))] = record
        name = os.path.basename(image)
        by_name[name] = None if name in by_name else record  # None: listed twice, ambiguous
    records: list[dict | None] = []
    unmatched = []
    for img in images:
        full = os.path.normpath(os.path.abspath(str(img)))
        rec = by_path.get(full)
        if rec is None:
            name = os.path.basename(str(img))
            if name in by_name and by_name[name] is None:
                raise ValueError(f"{path}: the file name {name!r} is listed more than once; give its path in the "
                                 f"image column to say which row is {img}")
            rec = by_name.get(name)
        if rec is None:
            unmatched.append(str(img))
        records.append(rec)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        notes.append(f"{len(unmatched)} image(s) have no row in {path}: scored with every value missing ({shown})")
    return records, notes
