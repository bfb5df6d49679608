"""Train on HAM10000, test on PH2: the README's pictures and its external-test row, made by the
documented commands on the real data.

    python experiments/external_ph2.py --results experiments/results --figures docs/images

1. `python train.py dataset=ham10000 ...`: a small ViT from scratch on the real HAM10000
   (melanoma vs rest, lesion-grouped split), with the calibrated report after fit;
2. `melanoma evaluate best.ckpt dataset=ph2 --external`: PH2 as it comes, nothing fitted;
3. `melanoma recalibrate best.ckpt dataset=ph2 --fraction 0.5`: calibration and threshold fitted on
   half of PH2, the other half reported;
4. the report's ROC, reliability diagram and confusion matrix side by side (docs/images/report.png),
   and a screenshot of `melanoma serve` on that checkpoint with two PH2 images uploaded
   (docs/images/serve.png, headless Chromium through selenium; skipped without chromium).

Writes experiments/results/external_ph2.md (date, machine, commands, a table with intervals).
`--run DIR` reuses a finished training run instead of step 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO.parent / "shared" / "data"))
EPOCHS = 8
# the model and budget: a 4-block ViT 96 wide at 64 px, from scratch, sized for minutes on a CPU
TRAIN = ["dataset=ham10000", "dataset.image_size=64", "dataset.batch_size=64", "dataset.num_workers=1",
         "model=vit_tiny", "model.pretrained=null", "model.backbone.kwargs.patch_size=8",
         "model.backbone.kwargs.embed_dim=96", "model.backbone.kwargs.depth=4",
         "model.backbone.kwargs.num_heads=4", "model.optimizer.lr=1e-3", "model.optimizer.head_lr=1e-3",
         "model.loss.class_weights=true", "trainer=cpu", f"trainer.max_epochs={EPOCHS}", "logger=csv",
         "num_threads=1", "print_report=true"]
FIGURES = ("roc", "reliability")  # the report's PNGs in the README's picture, in order
PICTURE_HEIGHT = 400
SHOWN = ("IMD058", "IMD002")  # in the screenshot: a melanoma and an atypical nevus (PH2_dataset.txt)


def run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - start


def melanoma(*args: str) -> list[str]:
    return [sys.executable, "-m", "melanoma.cli", *args]


def montage(report: Path, out: Path) -> None:
    """The report's figures side by side at one height, as a small palette PNG."""
    from PIL import Image

    panels = []
    for name in FIGURES:
        image = Image.open(report / f"{name}.png").convert("RGB")
        panels.append(image.resize((round(image.width * PICTURE_HEIGHT / image.height), PICTURE_HEIGHT),
                                   Image.Resampling.LANCZOS))
    sheet = Image.new("RGB", (sum(p.width for p in panels), PICTURE_HEIGHT), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width
    sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(ckpt: Path, images: list[Path], out: Path) -> None:
    """`melanoma serve CKPT` in a subprocess; headless Chromium uploads `images` and shoots the page."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        print("no chromium + chromedriver on PATH: the screenshot is skipped")
        return
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = subprocess.Popen(melanoma("serve", str(ckpt), "--port", str(port), "-q"), cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"melanoma serve did not start on port {port}")
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1000,1250", "--hide-scrollbars"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: "target sensitivity" in d.find_element(By.ID, "model-line").text)
            driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == len(images))
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('img.overlay')].every(i => i.complete && i.naturalWidth)"))
            raw = out.with_suffix(".raw.png")
            driver.save_screenshot(str(raw))
        finally:
            driver.quit()
        shot = Image.open(raw).convert("RGB")
        shot = shot.resize((shot.width * 3 // 4, shot.height * 3 // 4), Image.Resampling.LANCZOS)
        shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
        raw.unlink()
        print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/external_ph2"), help="runs and reports")
    parser.add_argument("--run", type=Path, help="a finished training run of TRAIN to reuse (skips step 1)")
    parser.add_argument("--results", type=Path, help="write external_ph2.md here")
    parser.add_argument("--figures", type=Path, help="write report.png and serve.png here")
    args = parser.parse_args()
    ham, ph2 = DATA / "HAM10000", DATA / "PH2"
    missing = [str(p) for p in (ham, ph2 / "images") if not p.is_dir()]
    if missing:
        sys.exit(f"expected the real HAM10000 and PH2 (flat variant, images/IMDxxx.jpg) under {DATA}; "
                 f"missing: {', '.join(missing)}. Set $MELANOMA_SHARED_DATA to the folder that holds both")
    args.work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    train = [*TRAIN, f"dataset.root={ham}", f"dataset.cache_dir={args.work / 'cache'}"]
    run_dir, seconds = args.run, {}
    if run_dir is None:
        run_dir = args.work / "train"
        seconds["train"] = run([sys.executable, "train.py", *train, f"hydra.run.dir={run_dir}"])
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    external, recalibrated, site = args.work / "ph2_external", args.work / "ph2_recalibrated", args.work / "ph2.ckpt"
    ph2_args = ["dataset=ph2", f"dataset.root={ph2}", "dataset.num_workers=0"]
    seconds["external"] = run(melanoma("evaluate", str(ckpt), *ph2_args, "--external", "--out", str(external), "-q"))
    seconds["recalibrate"] = run(melanoma("recalibrate", str(ckpt), *ph2_args, "--fraction", "0.5", "--seed", "0",
                                          "--out", str(site), "--report", str(recalibrated), "-q"))
    home = json.loads((run_dir / "report" / "metrics.json").read_text())
    away = json.loads((external / "metrics.json").read_text())
    recal = json.loads((recalibrated / "metrics.json").read_text())
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        montage(run_dir / "report", args.figures / "report.png")
        screenshot(ckpt, [ph2 / "images" / f"{name}.jpg" for name in SHOWN], args.figures / "serve.png")
    table = report_table(home, melanomas(run_dir / "report"), away, melanomas(external), recal)
    print(table)
    if args.results:
        write_results(args.results / "external_ph2.md", started, train, ph2_args, seconds, table, home)


def melanomas(report: Path) -> int:
    with (report / "predictions.csv").open() as f:
        return sum(row["true_label"] == "melanoma" for row in csv.DictReader(f))


def ci(value: float, bounds: list[float]) -> str:
    return f"{value:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def report_table(home: dict, home_mel: int, away: dict, away_mel: int, recal: dict) -> str:
    """One row per question, every number with its 95% interval (groups resampled whole)."""
    rows = [
        ("HAM10000 test split (home), calibrated on HAM10000 val", f"{home['n']} ({home_mel})",
         ci(home["auroc"], home["ci95"]["auroc"]), f"{home['threshold']:.4f}",
         ci(home["sensitivity_at_threshold"], home["ci95"]["sensitivity_at_threshold"]),
         ci(home["specificity_at_threshold"], home["ci95"]["specificity_at_threshold"]),
         ci(home["ece_melanoma_after_calibration"], home["ci95_calibration"]["ece_melanoma_after_calibration"])),
        ("PH2, all images, as it comes (`--external`: home calibration and threshold)", f"{away['n']} ({away_mel})",
         ci(away["auroc"], away["ci95"]["auroc"]), f"{away['threshold']:.4f}",
         ci(away["sensitivity_at_threshold"], away["ci95"]["sensitivity_at_threshold"]),
         ci(away["specificity_at_threshold"], away["ci95"]["specificity_at_threshold"]),
         ci(away["ece_melanoma"], away["ci95"]["ece_melanoma"])),
    ]
    part = recal["test_part"]
    cal = recal["ci95_calibration"]
    for name, point in recal["operating_points"].items():
        ece = {"original": ci(recal["ece_melanoma_before_calibration"], cal["ece_melanoma_before_calibration"]),
               "recalibrated": ci(recal["ece_melanoma_after_calibration"], cal["ece_melanoma_after_calibration"])}
        rows.append((f"PH2, the half not used to recalibrate: {name}", f"{part['n']} ({part['melanomas']})",
                     f"{recal['auroc']:.3f} (same ranking)", f"{point['threshold']:.4f}",
                     ci(point["sensitivity"], point["ci95"]["sensitivity"]),
                     ci(point["specificity"], point["ci95"]["specificity"]), ece.get(name, "—")))
    head = ("| what | n (melanomas) | AUROC [95% CI] | threshold | sensitivity [95% CI] | specificity [95% CI] "
            "| ECE of p(melanoma) [95% CI] |\n|---|---:|---|---:|---|---|---|\n")
    return head + "\n".join("| " + " | ".join(row) + " |" for row in rows)


def write_results(path: Path, started: datetime, train: list[str], ph2_args: list[str], seconds: dict,
                  table: str, home: dict) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ("" if "train" in seconds else
                                                                          " (training: a reused run, `--run`)")
    path.write_text(f"""# Train on HAM10000, test on PH2 (`experiments/external_ph2.py`)

The README's pictures and its external-test rows: the documented commands on the real data.

- Date: {started:%Y-%m-%d %H:%M} UTC. Machine: {cpu}, {os.cpu_count()} cores, CPU only, torch {torch.__version__},
  shared with other developers' work (wall times are this loaded box's). Wall time: {timing}.
- Data: the real HAM10000 (10,015 images at 200x150), melanoma vs rest, the lesion-grouped split of
  seed 42 (train / val / test = 70 / 15 / 15%); PH2 (200 images, 40 melanomas, flat variant at 384x288).
- Model: our ViT (`model=vit_tiny` made 96 wide, 4 blocks, 4 heads, patch 8; 472 K parameters) from
  scratch at 64 px, {EPOCHS} epochs of batch 64, AdamW lr 1e-3, class-weighted loss; the best checkpoint by
  val balanced accuracy. Calibration chosen on val: {home['calibration']}.
- Commands:

      python train.py {' '.join(train)} hydra.run.dir=RUN
      melanoma evaluate RUN/checkpoints/best.ckpt {' '.join(ph2_args)} --external --out ph2_external
      melanoma recalibrate RUN/checkpoints/best.ckpt {' '.join(ph2_args)} --fraction 0.5 --seed 0 --out ph2.ckpt --report ph2_recalibrated

{table}

Intervals: 95% percentile bootstrap, 1,000 resamples, lesions resampled whole (HAM10000 by
`lesion_id`; PH2 one image per lesion). Thresholds are chosen for 95% sensitivity: on HAM10000's
validation split (home), on the recalibration half (recalibrated), or on the reported half itself
(oracle: optimistic by construction, the bound, not a result). The recalibrated rows' AUROC is that
of the reported half, without an interval (calibration is monotone, so recalibrating does not
change it).
""")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
