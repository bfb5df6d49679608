"""Requests/s and latency of `melanoma serve` against `melanoma predict` on the same images, CPU.

A random-weight vit_tiny checkpoint at 224 px and generated 600x450 lesion JPEGs. The server is
`melanoma serve` in a subprocess on 127.0.0.1; clients post one image per request (as the page
does) with httpx, one client alone (latency) and several at once (throughput). The peer is
Predictor.predict_paths on the same files in this process, i.e. `melanoma predict` without
interpreter start, checkpoint load and the results file, batched as the CLI does and one image
at a time. Every variant runs with and without the rollout overlay. Variants are interleaved over
several rounds so load from other jobs hits them alike; ratios are against `melanoma predict`
(batched) measured in the same run.

    python experiments/bench_serve.py [--images 24] [--rounds 3] [--clients 4] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from melanoma.data.synthetic import render_lesion
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint
from melanoma.predict import Predictor

OVERLAYS = {"no overlay": "none", "rollout overlay": "rollout"}
PEER = "melanoma predict, batch 32"


def write_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, _ = render_lesion(rng, bool(i % 2), 450)
        p = folder / f"lesion_{i:04d}.jpg"
        Image.fromarray(img).resize((600, 450), Image.BICUBIC).save(p, quality=92)
        paths.append(p)
    return paths


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown CPU")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, tmp: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "melanoma.cli", "serve", str(ckpt), "--port", str(port), "-q"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"melanoma serve exited ({proc.returncode}); see {tmp / 'server.log'}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("melanoma serve did not answer /healthz within 120 s")


def serve_round(url: str, images: list[bytes], clients: int, overlay: str) -> tuple[float, list[float]]:
    """Every image once, spread over `clients` concurrent clients: (wall seconds, latencies)."""
    def client(k: int) -> list[float]:
        lat = []
        with httpx.Client(base_url=url, timeout=300) as c:
            for data in images[k::clients]:
                t0 = time.perf_counter()
                r = c.post("/api/predict", files=[("file", ("x.jpg", data, "image/jpeg"))], data={"overlay": overlay})
                lat.append(time.perf_counter() - t0)
                r.raise_for_status()
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(client, range(clients)) for x in xs]
    return time.perf_counter() - t0, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients in the throughput variant")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads, here and in the server (on a shared machine 1 can beat 2)")
    ap.add_argument("--out", type=Path, help="also write the result (markdown) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # not the 'no operating point' warning per Predictor
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_images(tmp / "images", args.images)
        images = [p.read_bytes() for p in paths]
        torch.manual_seed(0)
        kw = {"img_size": 224}
        ckpt = save_classifier_checkpoint(
            tmp / "vit_tiny.ckpt", build_classifier("vit_tiny", kw, {"synthetic": ["not_melanoma", "melanoma"]}),
            "vit_tiny", kw, image_size=224,
        )
        predictors = {1: Predictor(ckpt, batch_size=1, progress=False), 32: Predictor(ckpt, batch_size=32, progress=False)}
        proc, url = start_server(ckpt, tmp, args.threads)
        try:
            variants: dict[str, dict] = {}
            for name, overlay in OVERLAYS.items():  # warm-up: first requests build caches
                serve_round(url, images[:4], 1, overlay)
                predictors[1].predict_paths(paths[:4], attention_dir=tmp / "warm" if overlay != "none" else None)
            for r in range(args.rounds):
                for name, overlay in OVERLAYS.items():
                    for batch, predictor in predictors.items():
                        key = (f"melanoma predict, batch {batch}", name)
                        t0 = time.perf_counter()
                        recs = predictor.predict_paths(paths, attention_dir=tmp / f"maps{r}{batch}" if overlay != "none" else None)
                        wall = time.perf_counter() - t0
                        assert all(rec["error"] is None for rec in recs)
                        variants.setdefault(key, {"wall": [], "lat": []})["wall"].append(wall)
                    for clients in (1, args.clients):
                        key = (f"melanoma serve, {clients} client{'s' * (clients > 1)}", name)
                        wall, lat = serve_round(url, images, clients, overlay)
                        v = variants.setdefault(key, {"wall": [], "lat": []})
                        v["wall"].append(wall)
                        v["lat"].extend(lat)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    n = args.images
    rows = []
    for (what, overlay), v in variants.items():
        wall = statistics.median(v["wall"])
        peer = statistics.median(variants[(PEER, overlay)]["wall"])
        lat = sorted(v["lat"])
        p50 = f"{1000 * lat[len(lat) // 2]:.0f}" if lat else "-"
        p95 = f"{1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))]:.0f}" if lat else "-"
        rows.append(f"| {what} | {overlay} | {n / wall:.1f} | {1000 * wall / n:.1f} | {p50} | {p95} | {wall / peer:.2f} |")
    table = ("| runs | overlay | images/s | ms/image | p50 latency ms | p95 latency ms | x predict batch 32 (same overlay) |\n"
             "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows))
    print(table)
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "?"
        load = os.getloadavg()[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# melanoma serve: requests/s and latency against melanoma predict, CPU\n\n"
            f"{stamp}, commit {commit}; {cpu_name()}, {os.cpu_count()} cores, load average {load:.1f} at the end; "
            f"torch {torch.__version__}, {args.threads} torch threads (client and server); vit_tiny, 224 px, random weights; "
            f"{n} generated 600x450 JPEGs; one image per request; median of {args.rounds} interleaved rounds "
            f"(latency percentiles over all rounds).\n\n"
            f"`python experiments/bench_serve.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
