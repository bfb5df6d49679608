"""Time the README's main job, `python train.py experiment=quickstart`, and report its accuracy.

Runs train.py in a fresh process exactly as a user would (W&B offline, data generated on first
use: pass --fresh-data to include the generation in the time), then reads the run's
test/metrics.json.

    python experiments/quickstart.py [--fresh-data] [-- extra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-data", action="store_true", help="generate the synthetic data inside the timed run")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="quickstart_"))
    run_dir = work / "run"
    data_dir = work / "data" if args.fresh_data else REPO / "data"
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=quickstart", f"hydra.run.dir={run_dir}",
           f"paths.data_dir={data_dir}", *args.overrides]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"quickstart failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    load = os.getloadavg()
    print(f"command: python train.py experiment=quickstart {' '.join(args.overrides)}".rstrip())
    print(f"{'wall time (s)':<22} {wall:8.1f}")
    for key in ("test/acc", "test/bal_acc", "test/auroc", "test/sensitivity", "test/specificity"):
        print(f"{key:<22} {metrics[key]:8.4f}")
    print(f"{'load avg (1/5/15 min)':<22} {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    main()
