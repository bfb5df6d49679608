import os
from pathlib import Path

# Set before anything imports huggingface_hub or wandb: a hub miss retries for ~50 s and an
# online W&B run without network blocks for ~100 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
# content fingerprints are cached per dataset root: a private cache per test session, never the
# user's ~/.cache (subprocesses inherit it)
if "MELANOMA_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["MELANOMA_CACHE_DIR"] = tempfile.mkdtemp(prefix="melanoma-test-cache-")

import pytest  # noqa: E402
from helpers import HAM, REPO_ROOT, SYNTHETIC, TINY_COUNTS, tiny_checkpoint  # noqa: E402
from isic_layouts import write_isic2016, write_isic2017, write_isic2018, write_isic2019, write_isic2020  # noqa: E402
from layouts import DERMMEL_COUNTS, HAM_LESIONS, write_ham10000_layout, write_ph2_layout  # noqa: E402

from melanoma.data.synthetic import write_dermmel_layout  # noqa: E402
from melanoma.models.checkpoint import Calibration  # noqa: E402


# --native-bf16=on|off: mock a CPU with or without native bf16 matmuls for the whole session,
# subprocesses included (melanoma.precision reads the flags from $MELANOMA_CPUINFO); "host" (the
# default) keeps this machine's. The suite must pass both ways (.ci/run runs both).
MOCK_CPU_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512bw avx512vl"


def pytest_addoption(parser):
    parser.addoption("--native-bf16", choices=("host", "on", "off"), default="host",
                     help="mock the CPU's native bf16 (avx512_bf16) for the session: on, off, or host (default)")


def pytest_configure(config):
    mode = config.getoption("--native-bf16")
    if mode == "host":
        return
    import tempfile

    from melanoma.precision import CPUINFO_ENV

    info = Path(tempfile.mkdtemp(prefix="melanoma-cpuinfo-")) / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {MOCK_CPU_FLAGS}{' avx512_bf16' if mode == 'on' else ''}\n")
    os.environ[CPUINFO_ENV] = str(info)


def pytest_report_header(config):
    from melanoma.precision import BF16_CPU_FLAGS, cpu_flags

    native = sorted(set(BF16_CPU_FLAGS) & cpu_flags())
    return (f"native bf16 ({config.getoption('--native-bf16')}): "
            f"{', '.join(native) or 'none'}")


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


# --- miniature datasets in the real on-disk layouts (writers: layouts.py, isic_layouts.py) ------

@pytest.fixture(scope="session")
def tiny_dermmel(tmp_path_factory) -> Path:
    """The training tests' DermMel: helpers.TINY_COUNTS images per class and split, 32 px."""
    root = tmp_path_factory.mktemp("tiny_dermmel")
    write_dermmel_layout(root, TINY_COUNTS, image_size=32, seed=5)
    return root


@pytest.fixture(scope="session")
def dermmel_root(tmp_path_factory) -> Path:
    """A download nested the way Kaggle zips often are: <root>/melanoma/dermmel/DermMel/..."""
    root = tmp_path_factory.mktemp("dermmel_download")
    write_dermmel_layout(root / "melanoma" / "dermmel", DERMMEL_COUNTS, image_size=32, seed=3)
    return root


@pytest.fixture(scope="session")
def ham_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ham") / "HAM10000"
    return write_ham10000_layout(root, HAM_LESIONS, images_per_lesion=(1, 3), seed=1)


@pytest.fixture(scope="session")
def ph2_official_root(tmp_path_factory, ph2_table) -> Path:
    root = tmp_path_factory.mktemp("ph2_official") / "PH2Dataset"
    return write_ph2_layout(root, ph2_table, per_class=10, layout="official", seed=2)


@pytest.fixture(scope="session")
def ph2_flat_root(tmp_path_factory, ph2_table) -> Path:
    root = tmp_path_factory.mktemp("ph2_flat") / "PH2"
    return write_ph2_layout(root, ph2_table, per_class=5, layout="flat", seed=2)


@pytest.fixture(scope="session")
def isic2016_root(tmp_path_factory) -> Path:
    """Nested one level below the root the user gives."""
    root = tmp_path_factory.mktemp("isic2016")
    write_isic2016(root / "ISIC2016")
    return root


@pytest.fixture(scope="session")
def isic2017_root(tmp_path_factory) -> Path:
    return write_isic2017(tmp_path_factory.mktemp("isic2017"))


@pytest.fixture(scope="session")
def isic2018_root(tmp_path_factory) -> Path:
    return write_isic2018(tmp_path_factory.mktemp("isic2018"))


@pytest.fixture(scope="session")
def isic2019_root(tmp_path_factory) -> Path:
    return write_isic2019(tmp_path_factory.mktemp("isic2019"))


@pytest.fixture(scope="session")
def isic2020_root(tmp_path_factory) -> Path:
    return write_isic2020(tmp_path_factory.mktemp("isic2020"))


# --- checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def two_head_ckpt(tmp_path_factory) -> Path:
    """Untrained (seed 0), heads synthetic (active) and ham10000; the synthetic head calibrated
    as `melanoma evaluate` would store it (T=2, threshold 0.5 for sensitivity 0.95)."""
    return tiny_checkpoint(
        tmp_path_factory.mktemp("two_head_ckpt") / "tiny.ckpt", {"synthetic": SYNTHETIC, "ham10000": HAM},
        active_head="synthetic",
        calibration={"synthetic": Calibration(2.0, threshold=0.5, target_sensitivity=0.95)},
    )
