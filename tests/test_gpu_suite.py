"""The GPU run (bench/gpu_suite.py) without a GPU: what it would run and in which order (the device query
faked), that it needs neither the network nor a missing file, that a kill at any moment keeps every row
measured before it, that a hung or crashing test costs only itself, and that it ends by itself."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.auto_backend as auto_backend
from bench import gpu_suite, results
from lfm_kernels import configs

REPO = Path(__file__).resolve().parents[1]
FAKE_CUDA = '''
import socket
import torch

torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda *args, **kwargs: "NVIDIA H200 (faked)"


def no_network(*args, **kwargs):
    raise OSError("the GPU run tried to reach the network")


socket.socket.connect = no_network
'''
KERNEL_SMOKE = ("npr_residual", "topk_pool", "topk_pool_rank_dropout", "random_k_pool", "score_topk", "snet_head")


def suite(*args, env=None, timeout=None):
    return subprocess.run([sys.executable, "-m", "bench.gpu_suite", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


@pytest.fixture(scope="module")
def gpu_plan(tmp_path_factory):
    """[(tier, test)] of the GPU run as collected with torch.cuda faked (and sockets that refuse to connect),
    the authors' files nowhere to be found."""
    folder = tmp_path_factory.mktemp("fake_cuda")
    (folder / "fake_cuda.py").write_text(FAKE_CUDA)
    out = suite("--collect-only", env={"PYTEST_ADDOPTS": "-p fake_cuda", "PYTHONPATH": f"{folder}{os.pathsep}{REPO}",
                                       "LFM_SHARED": str(folder)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(line.split(" ", 1)) for line in out.stdout.splitlines()]


def test_gpu_run_order(gpu_plan):
    tiers = [tier for tier, _ in gpu_plan]
    assert list(dict.fromkeys(tiers)) == [t.name for t in gpu_suite.TIERS]  # every tier, each in one piece
    tests = [test for _, test in gpu_plan]

    smoke = [test for tier, test in gpu_plan if tier == "smoke"]
    precisions = ("float32", "tf32", "bfloat16")
    for op in KERNEL_SMOKE:
        assert {f"tests/test_gpu.py::test_{op}[cuda-{p}]" for p in precisions} <= set(smoke), op
    assert sum("test_gpu.py::test_snet_block[" in t for t in smoke) == 24  # 4 blocks x eval/training x 3
    assert not any("-cpu-" in t or "[cpu" in t for t in smoke)  # the CPU cases run in make test
    parity = "tests/test_gpu.py::test_lfm_parity_with_authors_checkpoint_on_gpu"
    assert {f"{parity}[{p}]" for p in precisions[:2]} <= set(smoke)
    assert smoke[-1] == "tests/test_gpu.py::test_lfm_compiles_on_gpu"  # compilation last in the tier

    dtypes = ("float32", "bfloat16")
    inference = [test for tier, test in gpu_plan if tier == "inference"]
    assert inference[:4] == ["bench/bench_peaks.py::test_copy_bandwidth",
                             "bench/bench_peaks.py::test_matmul_peak[float32]",
                             "bench/bench_peaks.py::test_matmul_peak[bfloat16]",
                             "bench/bench_host_time.py::test_host_time_per_forward"]
    # Ours and the eager anchors end to end, and batch 1 in a CUDA graph, in the same run.
    assert {f"bench/bench_lfm.py::test_inference[{p}-{d}-{b}-256]" for p in ("eager", "eager-channels-last", "triton")
            for d in dtypes for b in (1, 32, 256)} == {t for t in inference if "test_inference[" in t}
    assert {f"bench/bench_lfm.py::test_inference_cuda_graph[{p}-{d}]" for p in ("eager", "triton") for d in dtypes} == {
        t for t in inference if "test_inference_cuda_graph" in t}
    # The torch.compile anchors: only what the goals compare, so that each compilation gets the budget.
    for mode, graphed in (("default", True), ("max-autotune", False)):
        cases = {test for tier, test in gpu_plan if tier == f"compile-{mode}"}
        assert cases == {f"bench/bench_lfm.py::test_inference[compile-{mode}-{d}-256-256]" for d in dtypes} | {
            f"bench/bench_lfm.py::test_inference_cuda_graph[compile-{mode}-{d}]" for d in dtypes if graphed}
    # The training step: its host time (seconds), ours and eager, our kernels' profiles (after the rows they
    # are set against), then the compile-default anchor of the training goal (last: its compilation may not
    # fit the budget).
    training = [test for tier, test in gpu_plan if tier == "training"]
    assert training[:2] == [f"bench/bench_host_time.py::test_host_time_per_training_step[{d}]" for d in dtypes]
    assert {f"bench/bench_lfm.py::test_training_step[{p}-{d}]" for p in ("eager", "triton")
            for d in dtypes} == set(training[2:-6])
    assert training[-6:-2] == [f"bench/bench_kernel_profile.py::test_kernel_profile_{mode}[triton-{d}]"
                               for mode in ("inference", "training") for d in dtypes]
    assert training[-2:] == [f"bench/bench_lfm.py::test_training_step[compile-default-{d}]" for d in dtypes]
    assert not any("channels-last" in t for tier, t in gpu_plan if tier in ("training", "ops"))  # an anchor only

    triton_end_to_end = [i for i, t in enumerate(tests) if "test_inference[triton-" in t]
    compile_cases = [i for i, t in enumerate(tests) if "[compile-" in t and "test_training_step" not in t]
    training = [i for i, t in enumerate(tests) if "test_training_step" in t]
    assert max(triton_end_to_end) < min(compile_cases) and max(compile_cases) < min(training)
    assert all("-224]" not in t for t in tests)  # end to end at 224x224 is not part of the run
    assert all("[torch-" not in t and "ledger" not in t for t in tests)  # no CPU-only reference, no ledger


@pytest.mark.parametrize("target,recipe,scripts", [
    ("gpu-suite", "bash bench/gpu_suite.sh", ("gpu_suite.sh", "gpu_python.sh")),
    ("gpu-session OUT=out", "bash bench/gpu_session.sh out", ("gpu_session.sh", "gpu_suite.sh", "gpu_python.sh")),
])
def test_gpu_commands_install_nothing(target, recipe, scripts):
    # A clean make: under `make test` the parent's MAKEFLAGS/MAKELEVEL would add "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    made = subprocess.run(["make", "--no-print-directory", "-n", *target.split()], cwd=REPO, capture_output=True,
                          text=True, check=True, env=env).stdout
    assert made.strip() == recipe  # no venv, no pip: .venv is used only if it is there
    commands = [line for script in scripts for line in (REPO / "bench" / script).read_text().splitlines()
                if not line.lstrip().startswith("#")]
    assert not re.search(r"\b(pip|conda|apt-get|curl|wget)\b|-m venv|://", "\n".join(commands))


def test_without_a_gpu_it_says_so(tmp_path):
    out = suite(timeout=120)
    assert out.returncode == 1 and "no CUDA GPU visible" in out.stderr
    for script in ("gpu_suite.sh", "gpu_session.sh"):
        out = subprocess.run(["bash", str(REPO / "bench" / script), str(tmp_path / "out")], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
        command = script.removesuffix(".sh").replace("_", "-")
        assert out.returncode == 1 and f"{command}: no CUDA GPU visible" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_a_tiny_budget_ends_by_itself_and_says_what_it_skipped(tmp_path):
    out = suite("--allow-cpu", "--budget-s", "25", "--out", str(tmp_path), env={"LFM_SHARED": str(tmp_path)},
                timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    (path,) = tmp_path.glob("*.jsonl")
    loaded = results.load(path)
    assert loaded["header"]["budget_s"] == 25
    env = loaded["header"]["environment"]
    assert env["kernels_fingerprint"] == configs.kernels_fingerprint() and env["capability"] is None  # no GPU
    assert [t["status"] for t in loaded["tiers"]] == ["skipped"] * len(gpu_suite.TIERS)
    markdown = path.with_suffix(".md").read_text()
    assert "smoke skipped (the budget is spent" in markdown
    assert not path.with_suffix(".png").exists()  # no inference rows, nothing to plot
    assert path.with_suffix(".log").read_text() == out.stdout


FAKE_GPU_PYTHON = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda *args, **kwargs: "NVIDIA H200 (faked)"
torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
"""


@pytest.mark.slow  # a GPU run's machinery with a tiny budget (each tier skipped), then the two tables
def test_gpu_session_leaves_every_file_flat_in_its_folder(tmp_path):
    """gpu_session.sh with torch.cuda faked (a sitecustomize) and budgets too small for any tier or sweep:
    the run's files and the auto table updated from them, all in OUT."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_GPU_PYTHON)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(fake), "PYTHON": sys.executable, "LFM_SHARED": str(tmp_path),
           "GPU_SUITE_BUDGET_S": "20", "GPU_SESSION_BUDGET_S": "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = out.glob("*.jsonl")
    assert {p.name for p in out.iterdir()} >= {run.name, run.with_suffix(".log").name, run.with_suffix(".md").name,
                                               "auto_backend.json"}
    assert all(p.is_file() for p in out.iterdir())  # flat: what a device lease brings back
    table = json.loads((out / "auto_backend.json").read_text())
    committed = json.loads((REPO / "lfm_kernels" / "auto_backend.json").read_text())
    assert table["entries"] == committed["entries"]  # no op measured: the committed evidence stands
    assert configs.kernels_fingerprint() in table["measured_fingerprints"]
    assert "bench.tune: no budget left" in done.stdout


def test_auto_backend_takes_the_family_and_kernels_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200 (faked)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    path = tmp_path / "run.jsonl"
    results.create(path, dict(environment=results.environment(), budget_s=1))
    for provider, median_s in (("triton", 2.0), ("eager", 1.0)):
        results.append(path, dict(kind="row", op="snet_head", mode="forward", provider=provider, median_s=median_s,
                                  batch=256, dtype="float32"))
    table = tmp_path / "auto_backend.json"  # as gpu_session.sh writes it, beside the run's results
    assert auto_backend.main([str(path), "--table", str(table)]) == 0  # no --family: the header says sm90
    (entry,) = json.loads(table.read_text())["entries"]
    assert (entry["family"], entry["op"], entry["backend"]) == ("sm90", "snet_head", "torch")


def test_killed_at_a_random_moment_keeps_every_row_measured(tmp_path):
    seed = random.randrange(10**6)
    kill_after_s = random.Random(seed).uniform(0, 15)
    output = tmp_path / "stdout.txt"
    with open(output, "w") as stdout:  # SIGKILL to the run's whole process group, as `timeout -s KILL` does
        run = subprocess.Popen([sys.executable, "-m", "bench.gpu_suite", "--allow-cpu", "--tiers", "inference,training",
                                "--budget-s", "45", "--out", str(tmp_path / "out")], cwd=REPO, stdout=stdout,
                               stderr=subprocess.STDOUT, start_new_session=True)
        started = time.time()
        while not list(tmp_path.glob("out/*.jsonl")) and time.time() < started + 60:  # the clock starts here
            time.sleep(0.05)
        time.sleep(kill_after_s)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    context = f"seed {seed}, killed {kill_after_s:.1f} s after the results file appeared"
    (path,) = tmp_path.glob("out/*.jsonl")
    size = path.stat().st_size
    time.sleep(1.0)
    assert path.stat().st_size == size, f"{context}: something still writes after the kill"
    loaded = results.load(path)  # parses, a cut last line aside
    assert loaded["header"]["tiers"] == ["inference", "training"], context
    measured = {record["test"] for record in loaded["rows"] + loaded["profiles"]}
    passed = {line.split(" PASSED")[0] for line in output.read_text().splitlines() if " PASSED" in line}
    assert passed <= measured, context  # pytest prints PASSED after the row (or kernel profile) is on disk
    log = path.with_suffix(".log").read_text()
    assert all(test in log for test in passed), context


def test_a_hung_or_crashing_test_costs_only_itself(tmp_path):
    tests = tmp_path / "test_tier.py"
    tests.write_text("import os, time\n\n"
                     "def test_a():\n    pass\n\n"
                     "def test_hangs():\n    time.sleep(60)\n\n"
                     "def test_crashes():\n    os._exit(3)\n\n"
                     "def test_b():\n    pass\n")
    path = tmp_path / "run.jsonl"
    log = gpu_suite.Log(tmp_path / "run.log")
    started = time.time()
    tier = gpu_suite.Tier("smoke", (str(tests),), test_timeout_s=2)
    ok = gpu_suite.run_tier(tier, path, gpu_suite.child_env(on_gpu=False), log, deadline=started + 60,
                            kill_at=started + 90)
    outcomes = {test.rsplit("::", 1)[1]: r["outcome"] for test, r in results.load(path)["tests"].items()}
    assert ok
    assert outcomes == {"test_a": "passed", "test_hangs": "timeout", "test_crashes": "crashed", "test_b": "passed"}
    assert "test_hangs" in (tmp_path / "run.log").read_text()  # faulthandler's traceback of where it hung
    assert time.time() - started < 30
