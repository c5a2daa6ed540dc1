"""pytest glue for the benchmarks: collects bench_*.py, parametrizes providers and dtypes, installs the
device clock as pytest-benchmark's timer, prints the tables at the end and saves them on request.

    python -m pytest bench                               # the device's default providers and dtypes
    python -m pytest bench --bench-providers eager,triton -k inference
    python -m pytest bench --bench-save bench/results    # + <device>-<date>.json, .md and .png
"""
import time
from pathlib import Path

import pytest
import torch

from bench import harness
from bench.providers import PROVIDERS, dtype_name, reference_state_dict
from bench.report import format_goals, format_tables, save

SKIPPED = []  # {"test", "reason"} of every skipped benchmark, saved with the results
STARTED = time.time()


def pytest_addoption(parser):
    group = parser.getgroup("lfm benchmarks")
    group.addoption("--bench-providers", default=",".join(harness.DEFAULT_PROVIDERS),
                    help=f"comma-separated, from {', '.join(PROVIDERS)} (default: this device's)")
    group.addoption("--bench-save", default=None, metavar="DIR",
                    help="write <device>-<date>.json, .md and .png of the results to DIR")
    group.addoption("--bench-deadline", type=float, default=None, metavar="EPOCH_S",
                    help="skip the cases that would start after this time.time()")


def pytest_collect_file(file_path, parent):
    # Benchmarks are bench_*.py, so that `pytest tests` and the default test run never collect them.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads the timer option.
    if config.getoption("benchmark_timer", None) in (None, "time.perf_counter"):
        config.option.benchmark_timer = "bench.harness.device_clock"
    unknown = set(config.getoption("bench_providers").split(",")) - set(PROVIDERS)
    if unknown:
        raise pytest.UsageError(f"--bench-providers: unknown {sorted(unknown)}; choose from {PROVIDERS}")
    harness.DEADLINE = config.getoption("bench_deadline")
    # Fixed shapes: let cuDNN pick its fastest algorithms, as a tuned eager deployment would.
    torch.backends.cudnn.benchmark = True


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        providers = metafunc.config.getoption("bench_providers").split(",")
        metafunc.parametrize("provider", [p for p in PROVIDERS if p in providers])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", harness.DTYPES, ids=dtype_name)


BENCH_DIR = Path(__file__).parent


def run_priority(item) -> int:
    """Lower runs first, so that a time budget cuts the least telling cases: the peaks, end-to-end
    inference at 256x256 (the goals), the training step, the per-op rows of eager and our backends,
    end-to-end at 224x224, and last the per-op torch.compile rows (each compiles afresh). Tests from
    outside bench/ collected in the same run go first."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if item.path.parent != BENCH_DIR:
        return -1
    if item.path.stem == "bench_peaks":
        return 0
    if item.originalname == "test_inference":
        return 1 if params["size"] == 256 else 4
    if item.originalname == "test_training_step":
        return 2
    return 5 if params.get("provider", "").startswith("compile-") else 3


def pytest_collection_modifyitems(items):
    items.sort(key=run_priority)  # stable: file and parameter order within a tier


@pytest.fixture(autouse=True)
def _release_device_memory():
    yield
    if harness.ON_GPU:
        torch.cuda.empty_cache()


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call") and report.nodeid.startswith("bench/"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_terminal_summary(terminalreporter, config):
    rows = harness.RESULTS
    if not rows:
        return
    terminalreporter.section("lfm benchmarks")
    terminalreporter.write_line(format_tables(rows))
    terminalreporter.write_line("")
    terminalreporter.write_line(format_goals(rows))
    terminalreporter.write_line(f"\n{len(rows)} rows in {time.time() - STARTED:.0f} s")
    directory = config.getoption("bench_save")
    if directory:
        path = save(rows, SKIPPED, reference_state_dict()[1], directory)
        terminalreporter.write_line(f"saved {path} and its .md and .png")
