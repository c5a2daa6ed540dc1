"""The GPU run: one unattended command that installs nothing, needs no network, ends by itself within its
budget (450 s by default, compilations included) and saves every row the moment it is measured.

    bash bench/gpu_suite.sh [--out DIR] [--budget-s S] [--tiers smoke,inference,...]    (make gpu-suite)
    python -m bench.gpu_suite --collect-only     # what the run would run, tier by tier; needs no GPU

Tiers, in order; each is one pytest process, and what the budget cannot reach is skipped with its reason:
  smoke                 every Triton kernel, forward and backward, float32 and bfloat16, against the PyTorch
                        reference at LFM's sizes, and the authors' checkpoint (tests/test_gpu.py); at most
                        SMOKE_S
  inference             the measured peaks, the host time of one batch-1 forward with launches stubbed out,
                        then end to end at 256x256, triton, eager and eager channels_last, float32 and
                        bfloat16, batch 1, 32 and 256, and batch 1 in a CUDA graph (triton, eager)
  compile-default       the torch.compile anchors (default mode): end to end at batch 256 and batch 1 in a
                        CUDA graph
  compile-max-autotune  end to end at batch 256 in max-autotune mode, each case only when its estimated
                        compilation fits the budget left (bench/conftest.py)
  training              the training step, triton and eager, then where the device time of our inference
                        and training step goes, kernel by kernel (bench_kernel_profile)
  ops                   per-op rows, triton and eager
The budget counts from $GPU_SUITE_START (gpu_suite.sh sets it when the command starts), else from now.
A test may run TEST_TIMEOUT_S (a compile-* case COMPILE_TEST_TIMEOUT_S) before its process is ended.

Files, in --out (default bench/results/, or $GPU_SUITE_OUT), named <device>-<date>-<time>:
  .jsonl  the header and every row and test outcome, appended as they happen (bench.results)
  .log    everything the run printed
  .md .png  the report, rendered at the end (again with `python -m bench.report FILE.jsonl`)
A test that runs past its timeout, or whose process dies, is recorded as such and the tier goes on in a
new process without it. Exit code 0 when nothing failed; budget skips are not failures.
"""
import argparse
import importlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import results
from bench.suite_plugin import compiles

SMOKE_S = 120
TEST_TIMEOUT_S = 60
COMPILE_TEST_TIMEOUT_S = 240
DEFAULT_BUDGET_S = 450  # within 8 minutes with the final render and the start of Python
FINAL_RESERVE_S = 20  # the report at the end and a last test that overruns a little
START_MARGIN_S = 10  # no tier starts with less left: a pytest process takes seconds to start


@dataclass(frozen=True)
class Tier:
    name: str
    pytest_args: tuple
    cap_s: float = float("inf")
    test_timeout_s: float = TEST_TIMEOUT_S


BENCH_ARGS = ("bench", "--benchmark-columns=median,iqr,rounds,iterations", "--benchmark-sort=name")
TIERS = (
    Tier("smoke", ("tests/test_gpu.py", "-m", "gpu"), cap_s=SMOKE_S),
    Tier("inference", BENCH_ARGS),
    # The anchors of the goals before training and per-op rows, so that their compilations get the budget.
    Tier("compile-default", BENCH_ARGS),
    Tier("compile-max-autotune", BENCH_ARGS),
    Tier("training", BENCH_ARGS),
    Tier("ops", BENCH_ARGS),
)
BENCH_TIERS = tuple(t.name for t in TIERS if t.pytest_args == BENCH_ARGS)
FAILED_OUTCOMES = ("failed", "timeout", "crashed")
REQUIRED_MODULES = ("pytest", "pytest_benchmark", "lfm")  # lfm: with its own dependencies


class Log:
    """Prints and appends to the run's .log, line by line, so a kill keeps the log too."""

    def __init__(self, path=None):
        self.file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (open for the whole run)

    def write(self, text: str):
        sys.stdout.write(text)
        sys.stdout.flush()
        if self.file:
            self.file.write(text)

    def line(self, text: str = ""):
        self.write(text + "\n")


def pytest_command(tier: Tier, results_file, deadline: float, extra=()) -> list:
    saving = ["--suite-results", str(results_file)] if results_file else []
    return [sys.executable, "-m", "pytest", *tier.pytest_args, "-p", "bench.suite_plugin", "-p", "no:cacheprovider",
            "--suite-tier", tier.name, "--suite-deadline", f"{deadline:.3f}",
            "--suite-test-timeout", str(tier.test_timeout_s), "--suite-compile-timeout", str(COMPILE_TEST_TIMEOUT_S),
            *saving, *extra]


def child_env(on_gpu: bool) -> dict:
    """The tiers' environment: the checkout importable, output unbuffered (the log is line by line)."""
    path = os.pathsep.join(filter(None, [str(results.REPO), os.environ.get("PYTHONPATH")]))
    # Real kernels on a GPU; the interpreter for the CPU check of the machinery (which runs no kernel).
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0" if on_gpu else "1")


def run_process(command, env, log: Log, kill_at: float):
    """Run command, teeing its output to the log; kill it at kill_at. Returns (exit code, killed)."""
    process = subprocess.Popen(command, cwd=results.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace")
    reader = threading.Thread(target=lambda: [log.write(line) for line in process.stdout], daemon=True)
    reader.start()
    try:
        process.wait(timeout=max(0.0, kill_at - time.time()))
        killed = False
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        killed = True
    reader.join(timeout=10)
    return process.returncode, killed


def run_tier(tier: Tier, results_file, env, log: Log, deadline: float, kill_at: float) -> bool:
    """Run one tier, in new processes after a test that timed out or crashed; False on an error of pytest."""
    finished = []
    while True:
        # -v: one line per test in the log, with its outcome; -rfEs: failures and skip reasons at the end.
        command = pytest_command(tier, results_file, deadline, ["-v", "-rfEs", *(f"--deselect={t}" for t in finished)])
        code, killed = run_process(command, env, log, kill_at)
        tests = {t: r for t, r in results.load(results_file)["tests"].items() if r.get("tier") == tier.name}
        unfinished = [t for t, r in tests.items() if r["outcome"] == "started"]
        for test in unfinished:
            ran_s = time.time() - tests[test]["at"]
            if killed:
                outcome, reason = "timeout", f"the run's budget ran out after {ran_s:.0f} s of it"
            elif ran_s >= (limit := COMPILE_TEST_TIMEOUT_S if compiles(test) else tier.test_timeout_s):
                outcome, reason = "timeout", f"ran longer than {limit:.0f} s (where it hung: in the log)"
            else:
                outcome, reason = "crashed", f"its process ended with exit code {code} (see the log)"
            results.append(results_file, dict(kind="test", test=test, tier=tier.name, outcome=outcome, reason=reason,
                                              duration_s=round(ran_s, 3)))
            log.line(f"gpu-suite: {test}: {outcome}: {reason}")
        finished = list(tests)
        if not unfinished or killed or time.time() >= deadline:
            return killed or code in (0, 1, 5)  # 1: failed tests, recorded; 5: nothing selected


def unimportable(names) -> list:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            missing.append(f"{name} ({error})")
    return missing


def weights_line() -> tuple:
    """(random weights?, what the run loads), printed at the start and in the results' header."""
    from bench.providers import checkpoint_path

    path = checkpoint_path()
    if path:
        return False, f"authors' checkpoint {path}"
    return True, ("RANDOM WEIGHTS: the authors' checkpoint (lfm_official/bs_model.pth) is not under $LFM_SHARED, "
                  "./shared or ../shared; timings are valid, the checkpoint parity test does not run")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_SUITE_OUT", results.RESULTS_DIR)),
                        help="folder for the results (default $GPU_SUITE_OUT, else bench/results)")
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_SUITE_BUDGET_S", DEFAULT_BUDGET_S)),
                        help=f"seconds for the whole run, from $GPU_SUITE_START (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--tiers", default=",".join(t.name for t in TIERS),
                        help="comma-separated tiers to run, in the run's order (default: all)")
    parser.add_argument("--collect-only", action="store_true",
                        help="print `<tier> <test>` for every test the run would run, in order; runs nothing")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="test-only: run the machinery without a GPU (CPU providers; tests/test_gpu_suite.py)")
    args = parser.parse_args(argv)
    names = args.tiers.split(",")
    unknown = set(names) - {t.name for t in TIERS}
    if unknown:
        parser.error(f"--tiers: unknown {sorted(unknown)}")
    args.tiers = [t for t in TIERS if t.name in names]
    return args


def collect_only(tiers, env) -> int:
    failed = False
    for tier in tiers:
        command = pytest_command(tier, None, time.time() + 3600, ["--collect-only", "-q"])
        out = subprocess.run(command, cwd=results.REPO, env=env, capture_output=True, text=True)
        failed |= out.returncode not in (0, 5)
        for line in out.stdout.splitlines():
            if "::" in line:
                print(f"{tier.name} {line.strip()}")
        if out.returncode not in (0, 5):
            sys.stderr.write(out.stdout + out.stderr)
    return int(failed)


def main(argv=None) -> int:
    start = float(os.environ.get("GPU_SUITE_START") or time.time())
    args = parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    env = child_env(on_gpu)
    if args.collect_only:
        return collect_only(args.tiers, env)
    if not on_gpu and not args.allow_cpu:
        sys.stderr.write("gpu-suite: no CUDA GPU visible to this Python (torch.cuda.is_available() is False); "
                         f"{sys.executable}, torch {torch.__version__}\n")
        return 1
    missing = unimportable(REQUIRED_MODULES)
    if missing:  # the run installs nothing: say what this Python lacks before spending the budget
        sys.stderr.write(f"gpu-suite: {sys.executable} cannot import {'; '.join(missing)} (matplotlib is optional)\n")
        return 1
    environment = results.environment()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = results.new_results_path(args.out, environment["device"])
    log = Log(results_file.with_suffix(".log"))
    random_weights, weights = weights_line()
    test_deadline = start + args.budget_s - FINAL_RESERVE_S
    kill_at = start + args.budget_s - FINAL_RESERVE_S / 2
    results.create(results_file, dict(environment=environment, weights=weights, random_weights=random_weights,
                                      budget_s=args.budget_s, started_at=start, tiers=[t.name for t in args.tiers]))
    banner = "!" * 100
    log.line(f"gpu-suite: {environment['device']}, torch {environment['torch']}, triton {environment['triton']}, "
             f"commit {environment['commit']}; budget {args.budget_s:.0f} s, {time.time() - start:.0f} s spent")
    log.line(f"gpu-suite: results -> {results_file}")
    log.line(f"{banner}\ngpu-suite: {weights}\n{banner}" if random_weights else f"gpu-suite: weights: {weights}")
    ok = True
    for tier in args.tiers:
        tier_start = time.time()
        left = test_deadline - tier_start
        if left < START_MARGIN_S:
            reason = f"the budget is spent ({left:.0f} s left)"
            results.append(results_file, dict(kind="tier", tier=tier.name, status="skipped", reason=reason))
            log.line(f"gpu-suite: tier {tier.name}: skipped: {reason}")
            continue
        log.line(f"\ngpu-suite: tier {tier.name} at {tier_start - start:.0f} s")
        deadline = min(test_deadline, tier_start + tier.cap_s)
        ok &= run_tier(tier, results_file, env, log, deadline, min(kill_at, deadline + FINAL_RESERVE_S))
        results.append(results_file, dict(kind="tier", tier=tier.name, status="done",
                                          duration_s=round(time.time() - tier_start, 1)))
    from bench.report import write_report

    write_report(results_file)
    tests = results.load(results_file)["tests"].values()
    failures = [r for r in tests if r["outcome"] in FAILED_OUTCOMES]
    for r in failures:
        log.line(f"gpu-suite: {r['outcome'].upper()} {r['test']}: {r['reason']}")
    for r in tests:  # a correctness check that did not run is news (the checkpoint parity without weights)
        if r.get("tier") == "smoke" and r["outcome"] == "skipped":
            log.line(f"gpu-suite: NOT RUN {r['test']}: {r['reason']}")
    if random_weights:
        log.line(f"{banner}\ngpu-suite: {weights}\n{banner}")
    log.line(f"gpu-suite: {len(results.load(results_file)['rows'])} rows, {len(failures)} failures, "
             f"{time.time() - start:.0f} s; wrote {results_file} and its .log, .md, .png")
    return 0 if ok and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
