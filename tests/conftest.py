import os
from pathlib import Path

# Set before anything imports huggingface_hub or wandb: a hub miss retries for ~50 s and an
# online W&B run without network blocks for ~100 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data beside the project (../shared/data); users do not have it."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def ham10000_root(shared_data) -> Path:
    root = shared_data / "HAM10000"
    if not (root / "HAM10000_metadata.csv").exists():
        pytest.skip(f"real HAM10000 not found at {root}")
    return root


@pytest.fixture(scope="session")
def ph2_table(shared_data) -> Path:
    path = shared_data / "PH2" / "PH2_dataset.txt"
    if not path.exists():
        pytest.skip(f"PH2 label table not found at {path}")
    return path
