"""How long `python train.py dataset=ham10000 dataset.root=/no/such/dir` takes to fail, here and in
a peer checkout (e.g. main before the errors-first change), with and without HF_HUB_OFFLINE=1,
and whether it leaves a run folder. Prints a markdown table; run from the repository root:

    python experiments/bench_errors_first.py --peer /work/main [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
ARGS = ["dataset=ham10000", "dataset.root=/no/such/dir"]


def one(repo: Path, offline: bool, timeout: float) -> tuple[float, int, bool, str]:
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "disabled"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(repo / "train.py"), *ARGS], cwd=cwd, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            rc, err = -1, "timed out"
        seconds = time.perf_counter() - start
        left = (Path(cwd) / "runs").exists()
    named = "dataset root /no/such/dir" in err  # not just the override echoed back by Hydra
    return seconds, rc, left, "names the root" if named else "does not name the root"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", type=Path, required=True, help="another checkout to compare with")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=180)
    a = parser.parse_args()
    rows = []
    for offline in (True, False):
        medians = {}
        for name, repo in (("this", HERE), ("peer", a.peer.resolve())):
            runs = [one(repo, offline, a.timeout) for _ in range(a.repeats)]
            medians[name] = statistics.median(r[0] for r in runs)
            rows.append((name, offline, [f"{r[0]:.1f}" for r in runs], runs[0][1], runs[0][2], runs[0][3]))
        rows.append(("ratio peer/this", offline, [f"{medians['peer'] / medians['this']:.1f}x"], "", "", ""))
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f}\n")
    print("| checkout | HF_HUB_OFFLINE=1 | seconds to fail | exit | run folder left | message |")
    print("|---|---|---|---|---|---|")
    for name, offline, secs, rc, left, msg in rows:
        print(f"| {name} | {'yes' if offline else 'no'} | {', '.join(secs)} | {rc} | {left} | {msg} |")


if __name__ == "__main__":
    main()
