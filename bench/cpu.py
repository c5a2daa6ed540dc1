"""CPU inference benchmark: the authors' eager code vs every engine of `lfm predict`, in one interleaved run.

    python -m bench.cpu [--batches 1,8,32] [--rounds 5] [--images 64] [--weights bs_model.pth]

Per batch size, each round times one forward of every engine in turn (fp32, 256x256, no grad), so a
noisy machine slows all of them alike; the table shows medians as images/s, the ratio to the authors'
eager code (bench/authors.py) and the largest logit difference from it. Then `lfm predict` end to end
(a fresh process: start, weights, decoding, output) on a folder of PNGs, per engine, with its images/s
(peak memory: `/usr/bin/time -v lfm predict ...`). Without the authors' checkpoint in ../shared the
weights are random (same speed).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.authors import AuthorsLFM
from lfm import LFM
from lfm.engines import OnnxRunner, cxx_compiler, prepare

SIZE = 256
OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "lfm_official" / "bs_model.pth"


def _engines(model):
    """name -> callable for every engine this machine runs."""
    engines = {"torch": model}
    if cxx_compiler() is not None:
        engines["compile"] = prepare(model, "compile", torch.device("cpu"), (SIZE, SIZE), "bench")
    try:
        engines["onnx"] = OnnxRunner(model, (SIZE, SIZE))
    except Exception as err:  # noqa: BLE001 - onnxruntime missing or the export failing: shown, then skipped
        print(f"onnx engine skipped: {err}", file=sys.stderr)
    return engines


def forward_table(weights, batches, rounds):
    state = torch.load(weights, weights_only=True, map_location="cpu") if weights else LFM().state_dict()
    authors = AuthorsLFM().eval()
    authors.load_state_dict(state)
    model = LFM(backend="torch").eval()
    model.load_state_dict(state)
    runs = {"authors' eager": authors, **_engines(model)}
    print(f"forward, fp32, {SIZE}x{SIZE}, {torch.get_num_threads()} threads, median of {rounds} interleaved rounds")
    print(f"{'batch':>5} {'engine':<15} {'images/s':>9} {'x authors':>9} {'max |dlogit|':>12}")
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
            expected = authors(x)
            diffs = {name: (run(x) - expected).abs().max().item() for name, run in runs.items()}  # also warms up
            times = {name: [] for name in runs}
            for _ in range(rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(x)
                    times[name].append(time.perf_counter() - start)
            base = statistics.median(times["authors' eager"])
            for name in runs:
                median = statistics.median(times[name])
                print(f"{batch:>5} {name:<15} {batch / median:>9.2f} {base / median:>9.2f} {diffs[name]:>12.1e}")


_PREDICT = "import sys; from lfm.cli import main; sys.exit(main(sys.argv[1:]))"


def predict_table(weights, n_images):
    print(f"\nlfm predict end to end: {n_images} PNGs (320x320 -> {SIZE}x{SIZE}), default settings, fresh process")
    print(f"{'engine':<10} {'images/s':>9} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n_images):
            Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
        if weights is None:
            from lfm.weights import save_weights

            weights = Path(tmp) / "lfm.safetensors"
            save_weights(LFM(), weights, {"model": "lfm", "k": 16})
        env = dict(os.environ, LFM_CACHE=str(Path(tmp) / "cache"))
        for engine in ("torch", "compile", "onnx"):
            argv = ["predict", "--weights", str(weights), str(folder), "--engine", engine]
            if engine == "onnx":  # export once, outside the timing (cached, as it is for users)
                subprocess.run([sys.executable, "-c", _PREDICT, *argv[:3], str(folder / "0000.png"), *argv[4:]],
                               env=env, capture_output=True)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _PREDICT, *argv], env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                print(f"{engine:<10} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            print(f"{engine:<10} {n_images / seconds:>9.2f} {seconds:>8.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (1,8,32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size (5)")
    parser.add_argument("--images", type=int, default=64, help="PNGs for lfm predict end to end (64; 0 = skip)")
    parser.add_argument("--weights", default=str(OFFICIAL) if OFFICIAL.exists() else None,
                        help="the authors' .pth (default: ../shared/lfm_official/bs_model.pth when present)")
    args = parser.parse_args(argv)
    forward_table(args.weights, [int(b) for b in args.batches.split(",")], args.rounds)
    if args.images:
        predict_table(args.weights, args.images)


if __name__ == "__main__":
    main()
