"""The shape of the package: lines per package, the ten longest functions, and how often one
`melanoma evaluate` reads the checkpoint file (torch.load calls), for the house-keeping record.

    python experiments/house_metrics.py [--evaluate CKPT]

The torch.load count needs a checkpoint (any one made by `python train.py experiment=quickstart`);
it runs this checkout's `melanoma evaluate`."""

import argparse
import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "melanoma"


def lines_per_package(package: Path = PACKAGE) -> Counter:
    counts = Counter()
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        counts[parts[0]] += len(path.read_text().splitlines())
    return counts


def longest_functions(n: int = 10, package: Path = PACKAGE) -> list[tuple[int, str]]:
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1,
                              f"{path.relative_to(package.parent)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)[:n]


COUNT_LOADS = """
import sys, torch, runpy
calls = []
real = torch.load
def counting(*a, **k):
    calls.append(str(a[0]) if a else "?")
    return real(*a, **k)
torch.load = counting
sys.argv = ["melanoma", "evaluate", *sys.argv[1:]]
try:
    runpy.run_module("melanoma.cli", run_name="__main__")
except SystemExit:
    pass
print("TORCH_LOAD_CALLS", len(calls), file=sys.stderr)
"""


def torch_loads_per_evaluate(ckpt: str, out: str) -> int:
    done = subprocess.run([sys.executable, "-c", COUNT_LOADS, ckpt, "--out", out],
                          capture_output=True, text=True, cwd=ROOT)
    line = [l for l in done.stderr.splitlines() if l.startswith("TORCH_LOAD_CALLS")]
    if not line:
        raise SystemExit(done.stderr[-2000:])
    return int(line[-1].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluate", metavar="CKPT")
    parser.add_argument("--out", default="/tmp/house_metrics_eval")
    parser.add_argument("--package", type=Path, default=PACKAGE,
                        help="another checkout's melanoma/ folder (e.g. from git archive), for a before/after")
    args = parser.parse_args()
    counts = lines_per_package(args.package)
    print("| package | lines |\n|---|---:|")
    for name, lines in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {lines} |")
    print(f"| **total** | {sum(counts.values())} |\n")
    print("| lines | function |\n|---:|---|")
    for lines, name in longest_functions(package=args.package):
        print(f"| {lines} | `{name}` |")
    if args.evaluate:
        print(f"\ntorch.load calls in one `melanoma evaluate`: {torch_loads_per_evaluate(args.evaluate, args.out)}")


if __name__ == "__main__":
    main()
