"""CPU benchmark: the authors' eager code vs every engine of `lfm predict`, and vs our training step, interleaved.

    python -m bench.cpu [--batches 1,8,32] [--rounds 5] [--train-rounds 5] [--images 64] [--predict-rounds 3]
                        [--weights bs_model.pth]

Forward (fp32, 256x256, no grad): per batch size, each round times one forward of every engine in turn,
so a noisy machine slows all of them alike; the table shows the median images/s, the median over rounds
of the ratio to the authors' eager code (bench/authors.py) in the same round, and the largest logit
difference from it. Training (batch 8, 224x224, the authors' crop): one step (forward, BCE-with-logits,
backward, Adam) of the authors' code with their optimizer (Adam's default implementation) against ours
(the torch backend, fused Adam, as `lfm train` runs it), interleaved the same way, with the largest
gradient difference of the first step (same weights, same dropout mask), relative to the largest
gradient. Then `lfm predict` end to end (a fresh process: start, weights, decoding, output) on a folder
of PNGs, per engine, and for the torch engine under each malloc found by ldconfig (LD_PRELOAD), with
images/s and the process's peak memory. Without the authors' checkpoint in ../shared the weights are
random (same speed). The forward engines share this process, so ONNX Runtime's threads and torch's
OpenMP threads share the cores; `lfm predict` runs each engine alone. On a machine that other jobs
share, `chrt -f 10 python -m bench.cpu` keeps them from taking the cores during the run.
"""
import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.authors import AuthorsLFM
from lfm import LFM
from lfm.engines import OnnxRunner, cxx_compiler, prepare

SIZE = 256
TRAIN_BATCH, TRAIN_SIZE = 8, 224
OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "lfm_official" / "bs_model.pth"
# Allocators to try under LD_PRELOAD for `lfm predict` (Debian: libtcmalloc-minimal4, libjemalloc2).
ALLOCATORS = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}


def _state(weights):
    return torch.load(weights, weights_only=True, map_location="cpu") if weights else LFM().state_dict()


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


def _interleaved(runs: dict, rounds: int, base: str):
    """Per name, (median seconds, median over rounds of base's seconds / this one's in the same round)."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), statistics.median(b / s for b, s in zip(times[base], t)))
            for name, t in times.items()}


def forward_table(weights, batches, rounds):
    state = _state(weights)
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
            stats = _interleaved({name: (lambda run=run: run(x)) for name, run in runs.items()}, rounds,
                                 "authors' eager")
            for name, (seconds, ratio) in stats.items():
                print(f"{batch:>5} {name:<15} {batch / seconds:>9.2f} {ratio:>9.2f} {diffs[name]:>12.1e}")


def _train_step(model, optimizer, x, target):
    torch.manual_seed(0)  # the same dropout mask for both
    loss = F.binary_cross_entropy_with_logits(model(x), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _gradients(model, x, target):
    """The gradients of one step of a copy of `model` (the same dropout mask for both)."""
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    F.binary_cross_entropy_with_logits(model(x), target).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def train_table(weights, rounds):
    state = _state(weights)
    authors = AuthorsLFM().train()
    ours = LFM(backend="torch", dropout="released").train()  # the authors' dropout as released
    for model in (authors, ours):
        model.load_state_dict(state)
    steps = {
        "authors' eager": (authors, torch.optim.Adam(authors.parameters(), lr=1e-4)),
        "torch": (ours, torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-4, fused=True)),
    }
    x = torch.randn(TRAIN_BATCH, 3, TRAIN_SIZE, TRAIN_SIZE, generator=torch.Generator().manual_seed(0))
    target = (torch.arange(TRAIN_BATCH) % 2).float().unsqueeze(1)
    reference, ours_grads = _gradients(authors, x, target), _gradients(ours, x, target)
    scale = max(g.abs().max().item() for g in reference.values())
    diff = max((ours_grads[name] - g).abs().max().item() for name, g in reference.items()) / scale
    for model, optimizer in steps.values():
        _train_step(model, optimizer, x, target)  # warm-up (optimizer state, allocations)
    stats = _interleaved({name: (lambda mo=mo: _train_step(*mo, x, target)) for name, mo in steps.items()}, rounds,
                         "authors' eager")
    print(f"\ntraining step, fp32, batch {TRAIN_BATCH}, {TRAIN_SIZE}x{TRAIN_SIZE}, "
          f"median of {rounds} interleaved rounds")
    print(f"{'step':<15} {'images/s':>9} {'x authors':>9} {'max |dgrad| / max |grad|':>25}")
    for name, (seconds, ratio) in stats.items():
        shown = "" if name == "authors' eager" else f"{diff:.1e}"
        print(f"{name:<15} {TRAIN_BATCH / seconds:>9.2f} {ratio:>9.2f} {shown:>25}")


_PREDICT = "import sys; from lfm.cli import main; sys.exit(main(sys.argv[1:]))"


def _allocators():
    """name -> path of each allocator in ALLOCATORS that ldconfig knows."""
    listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    found = {}
    for name, lib in ALLOCATORS.items():
        paths = [line.split("=>")[-1].strip() for line in listed.splitlines() if line.strip().startswith(lib)]
        if paths:
            found[name] = paths[0]
    return found


def _run_predict(argv, env):
    """(seconds, peak resident memory in GB, error line or None) of one `lfm predict` process. The peak is
    the process's VmHWM, read until it ends (its rusage would also count the memory of this process,
    which it was forked from)."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _PREDICT, *argv], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):  # ending, or a kernel without VmHWM
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        err.seek(0)
        last = (err.read().strip().splitlines()[-1:] or ["?"])[0]
    return seconds, peak / 2**20, last if proc.returncode else None


def predict_table(weights, n_images, rounds):
    print(f"\nlfm predict end to end: {n_images} PNGs (320x320 -> {SIZE}x{SIZE}), default settings, fresh process, "
          f"median of {rounds} interleaved rounds")
    print(f"{'engine':<20} {'images/s':>9} {'x torch':>8} {'seconds':>8} {'peak GB':>8}")
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
        runs = {engine: (engine, env) for engine in ("torch", "compile", "onnx")}
        runs.update({f"torch + {name}": ("torch", dict(env, LD_PRELOAD=path)) for name, path in _allocators().items()})
        # The ONNX export is cached for users after their first run; make it once, outside the timing.
        _run_predict(["predict", "--weights", str(weights), str(folder / "0000.png"), "--engine", "onnx"], env)
        results = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (engine, run_env) in runs.items():
                results[name].append(_run_predict(["predict", "--weights", str(weights), str(folder),
                                                   "--engine", engine], run_env))
        base = results["torch"]
        for name, rows in results.items():
            failed = next((row[2] for row in rows if row[2]), None)
            if failed:
                print(f"{name:<20} failed: {failed}")
                continue
            seconds = statistics.median(row[0] for row in rows)
            ratio = statistics.median(b[0] / row[0] for b, row in zip(base, rows))
            peak = max(row[1] for row in rows)
            print(f"{name:<20} {n_images / seconds:>9.2f} {ratio:>8.2f} {seconds:>8.1f} {peak:>8.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (1,8,32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size (5)")
    parser.add_argument("--train-rounds", type=int, default=5, help="timed training steps of each (5; 0 = skip)")
    parser.add_argument("--images", type=int, default=64, help="PNGs for lfm predict end to end (64; 0 = skip)")
    parser.add_argument("--predict-rounds", type=int, default=3, help="lfm predict runs of each engine (3)")
    parser.add_argument("--weights", default=str(OFFICIAL) if OFFICIAL.exists() else None,
                        help="the authors' .pth (default: ../shared/lfm_official/bs_model.pth when present)")
    args = parser.parse_args(argv)
    forward_table(args.weights, [int(b) for b in args.batches.split(",")], args.rounds)
    if args.train_rounds:
        train_table(args.weights, args.train_rounds)
    if args.images:
        predict_table(args.weights, args.images, args.predict_rounds)


if __name__ == "__main__":
    main()
