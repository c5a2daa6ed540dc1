"""torchrun with 2 CPU processes (gloo) against one process with the same global batch.

With DistributedDataParallel each rank normalizes with the BatchNorm statistics of its own half of
the global batch, the gradients are averaged, and rank 0's running statistics are broadcast at the
start of every forward (so rank 1's updates are dropped). The one-process reference below reproduces
exactly that: per step, rank 0's half then rank 1's half through the same model, each loss halved,
rank 1's running-statistics update undone, one optimizer step. Then training must agree up to float
reduction order, and sharded evaluation must give the same probabilities as one process.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_data import write_labeled, write_training_set
from torch.utils.data import DistributedSampler

from lfm.cli import main
from lfm.data import ImageDataset, collate_samples, training_items
from lfm.images import TrainTransform
from lfm.train import TrainOptions
from lfm.weights import build_model

REPO = Path(__file__).resolve().parents[1]
WORLD, GLOBAL_BATCH, EPOCHS, LR = 2, 8, 2, 1e-3


def _torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                           "-m", "lfm", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _reference_training(data: Path) -> dict:
    """One process, the per-rank split of every global batch, as DDP computes it."""
    opts = TrainOptions(data=str(data), resize=None, crop=None, dropout="off", lr=LR, batch_size=GLOBAL_BATCH)
    torch.manual_seed(opts.seed)
    model = build_model(opts.model_config(), backend="torch").train()
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=LR, betas=opts.betas,
                                 fused=True)  # as lfm train
    dataset = ImageDataset(training_items(data, "train"), TrainTransform.from_options(opts), seed=opts.seed)
    samplers = [DistributedSampler(dataset, num_replicas=WORLD, rank=r, shuffle=True, seed=opts.seed)
                for r in range(WORLD)]
    local = GLOBAL_BATCH // WORLD
    for epoch in range(EPOCHS):
        dataset.epoch = epoch
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shards = [list(sampler) for sampler in samplers]
        for start in range(0, len(shards[0]), local):
            optimizer.zero_grad()
            for rank, shard in enumerate(shards):
                images, labels, _ = collate_samples([dataset[i] for i in shard[start:start + local]]).groups[0]
                loss = F.binary_cross_entropy_with_logits(model(images), labels.float().unsqueeze(1))
                (loss / WORLD).backward()
                if rank == 0:
                    after_rank0 = {name: b.clone() for name, b in model.named_buffers()}
            with torch.no_grad():  # rank 0's running statistics win
                for name, buffer in model.named_buffers():
                    buffer.copy_(after_rank0[name])
            optimizer.step()
    return model.state_dict()


@pytest.mark.slow
def test_torchrun_training_and_eval_match_one_process(tmp_path):
    data = write_training_set(tmp_path / "data", classes=("car",), n_train=9, n_val=5)  # odd: uneven shards
    run = tmp_path / "ddp"
    done = _torchrun("train", "--data", data, "--out", run, "--epochs", EPOCHS, "--batch-size", GLOBAL_BATCH,
                     "--lr", LR, "--resize", 0, "--crop", 0, "--dropout", "off", "--patience", 0, "--workers", 0,
                     "--device", "cpu", "--no-progress")
    assert done.stdout.count("best validation accuracy") == 1  # rank 0 alone reports
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers, so most float sums run in the same order
    try:
        expected = _reference_training(data)
    finally:
        torch.set_num_threads(threads)
    got = load_file(run / "last.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(got[name], tensor), name
        else:
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    with open(run / "log.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]

    # Sharded evaluation: each rank scores every other image; rank 0 gathers and writes.
    write_labeled(tmp_path / "test" / "extra", 3, 4, np.random.default_rng(5))
    roots = [data / "val", tmp_path / "test"]
    _torchrun("eval", "--weights", run / "last.safetensors", "--data", *roots, "--out", tmp_path / "eval2",
              "--no-resize", "--workers", 0, "--device", "cpu")
    assert main(["eval", "--weights", str(run / "last.safetensors"), "--data", *map(str, roots),
                 "--out", str(tmp_path / "eval1"), "--no-resize", "--workers", "0"]) == 0
    one, two = (list(csv.DictReader((tmp_path / name / "predictions.csv").read_text().splitlines()))
                for name in ("eval1", "eval2"))
    assert [(r["subset"], r["path"], r["label"]) for r in one] == [(r["subset"], r["path"], r["label"]) for r in two]
    assert len(one) == 2 * 5 + 7
    assert [float(r["prob_fake"]) for r in two] == pytest.approx([float(r["prob_fake"]) for r in one], rel=1e-5)
