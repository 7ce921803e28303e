"""Portrait world and evaluator figures.

    python -m benchmarks.world --json benchmarks/results/world.json

- evaluator_mean_accuracy / evaluator_min_accuracy / evaluator_outlier_auc on held-out renders
  (attribute combinations never trained on, unseen outlier images) at the embedded resolution;
- render_per_s_64 / render_per_s_128: portraits per second, one thread;
- app_cold_start_s: from `python app.py` to the first page served.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.common import parser, write
from pipelines.data.bank import render_bank
from pipelines.data.portrait_world import measure_render_rate
from pipelines.evaluation import EMBEDDED_EVALUATOR, Evaluator
from pipelines.training.train_evaluator import evaluate

ROOT = Path(__file__).resolve().parent.parent


def app_cold_start_s(timeout: float = 300) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the app did not serve a page in time")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--heldout_images", type=int, default=4000)
    p.add_argument("--outlier_rate", type=float, default=0.1)
    args = p.parse_args()
    figures: dict[str, float] = {}

    torch.set_num_threads(1)
    figures["render_per_s_64"] = measure_render_rate(64, n=300)
    figures["render_per_s_128"] = measure_render_rate(128, n=200)
    torch.set_num_threads(2)

    evaluator = Evaluator.from_pretrained(EMBEDDED_EVALUATOR, device=args.device)
    res = evaluator.network.resolution
    # a different seed range from the one the evaluator was validated on during training
    bank = render_bank(args.heldout_images, size=res, seed=77_000_000, split="heldout",
                       outlier_rate=args.outlier_rate, workers=2)
    ev = evaluate(evaluator, bank)
    figures["evaluator_resolution"] = res
    figures["evaluator_mean_accuracy"] = ev["mean_accuracy"]
    figures["evaluator_min_accuracy"] = ev["min_accuracy"]
    figures["evaluator_outlier_auc"] = ev["outlier_auc"]
    figures.update({f"evaluator_{k}": v for k, v in ev.items() if k.startswith("acc_")})

    figures["app_cold_start_s"] = app_cold_start_s()
    write(figures, args.json, "benchmarks.world", card=Path(EMBEDDED_EVALUATOR) if args.card else None)


if __name__ == "__main__":
    main()
