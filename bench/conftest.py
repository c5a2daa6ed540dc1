"""pytest glue for the benchmarks: collects bench_*.py, parametrizes providers and dtypes, installs the
device clock as pytest-benchmark's timer, orders the cases by the GPU run's tiers and prints the tables
at the end. The GPU run (bench.gpu_suite) runs one tier per process (`--suite-tier`) and saves rows.

    python -m pytest bench                               # the device's default providers and dtypes
    python -m pytest bench --bench-providers eager,triton -k inference
"""
import time

import pytest
import torch

from bench import harness, results
from bench.gpu_suite import BENCH_TIERS
from bench.providers import INFERENCE_ONLY_PROVIDERS, PROVIDERS, dtype_name
from bench.report import GOAL_SIZE, format_goals, format_profiles, format_tables
from bench.shapes import LARGE_BATCH
from bench.suite_plugin import time_left

STARTED = time.time()
# Compile seconds of a compile-* case, used to skip a compilation the budget cannot finish. Guesses for an
# H100/H200 (Inductor on LFM's few convs; max-autotune benchmarks Triton GEMM templates for each conv),
# replaced for max-autotune by this factor times the compile-default warm-up measured on the same case.
COMPILE_S_GUESS = {"compile-default": 30.0, "compile-max-autotune": 150.0}
MAX_AUTOTUNE_OVER_DEFAULT = 5.0


def pytest_addoption(parser):
    group = parser.getgroup("lfm benchmarks")
    group.addoption("--bench-providers", default=",".join(harness.DEFAULT_PROVIDERS),
                    help=f"comma-separated, from {', '.join(PROVIDERS)} (default: this device's)")


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
    # Fixed shapes: let cuDNN pick its fastest algorithms, as a tuned eager deployment would; float32 matmuls
    # (the Linear, Inductor's GEMM templates) in TF32, as a user of torch.compile sets it.
    torch.backends.cudnn.benchmark = True
    if harness.ON_GPU:
        torch.set_float32_matmul_precision("high")


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        # A benchmark names its providers in a `providers` attribute; by default every provider but the
        # end-to-end-only anchors.
        chosen = metafunc.config.getoption("bench_providers").split(",")
        allowed = getattr(metafunc.function, "providers", [p for p in PROVIDERS if p not in INFERENCE_ONLY_PROVIDERS])
        metafunc.parametrize("provider", [p for p in allowed if p in chosen])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", harness.DTYPES, ids=dtype_name)


def _params(item) -> dict:
    return item.callspec.params if hasattr(item, "callspec") else {}


def _provider(item) -> str:
    """The item's provider, "" for none (no parameter, or none of the chosen providers: pytest's empty set)."""
    provider = _params(item).get("provider")
    return provider if isinstance(provider, str) else ""


def suite_tier(item):
    """The GPU run's tier of a benchmark (bench.gpu_suite.TIERS), or None for those it leaves out: the peaks,
    the host time and inference at 256x256 (the goals) for our backend and the eager anchors, then the
    torch.compile anchors per mode, then the training step and the kernel profiles of ours (diagnostics: after
    the anchors' compilations) and the per-op rows. Compilation takes minutes per
    case, so the compile tiers take only what the goals compare: inference at batch LARGE_BATCH and the
    CUDA-graph batch 1 (fewer cases, each with the budget to finish). The training step's compile-default
    anchor runs in the training tier, after ours. End to end inference at 224x224 is left out."""
    params = _params(item)
    provider = _provider(item)
    if item.originalname == "test_inference" and params["size"] != GOAL_SIZE:
        return None
    if item.originalname == "test_training_step" and provider == "compile-default":
        return "training"  # the training goal's anchor, after our rows and profiles (run_priority)
    if provider.startswith("compile-"):
        anchor = item.originalname == "test_inference_cuda_graph" or (
            item.originalname == "test_inference" and params["batch"] == LARGE_BATCH)
        return provider if anchor else None
    if item.originalname == "test_host_time_per_training_step":
        return "training"
    if item.path.stem in ("bench_peaks", "bench_host_time") or item.originalname.startswith("test_inference"):
        return "inference"
    return "training" if item.originalname == "test_training_step" or item.path.stem == "bench_kernel_profile" else \
        "ops"


def run_priority(item):
    """Sort key: by tier, then the peaks, the host time, end to end, the training step, the kernel profiles
    (seconds each), the training step's compiled anchor (its compilation may not fit the budget) and the
    per-op rows within one; tests collected from outside bench/ go first."""
    if not item.path.stem.startswith("bench_"):
        return (-1, 0)
    tier = suite_tier(item)
    training = 5 if _provider(item).startswith("compile-") else 3
    within = {"bench_peaks": 0, "bench_host_time": 1,
              "bench_lfm": 2 if item.originalname.startswith("test_inference") else training,
              "bench_kernel_profile": 4}.get(item.path.stem, 6)
    return (BENCH_TIERS.index(tier) if tier else len(BENCH_TIERS), within)


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("suite_tier", None)
    if tier is not None:
        deselected = [item for item in items if item.path.stem.startswith("bench_") and suite_tier(item) != tier]
        items[:] = [item for item in items if item not in deselected]
        config.hook.pytest_deselected(items=deselected)
    items.sort(key=run_priority)  # stable: file and parameter order within a tier


def estimated_compile_s(item) -> float:
    provider = _provider(item)
    if provider == "compile-max-autotune":
        rows = results.load(results.ACTIVE_FILE)["rows"] if results.ACTIVE_FILE else harness.RESULTS
        default_case = item.nodeid.replace("compile-max-autotune", "compile-default")
        measured = [r["warmup_s"] for r in rows if r["test"] == default_case]
        if measured:
            return MAX_AUTOTUNE_OVER_DEFAULT * measured[0]
    return COMPILE_S_GUESS[provider]


def pytest_runtest_setup(item):
    if not _provider(item).startswith("compile-"):
        return
    needed, left = estimated_compile_s(item), time_left(item.config)
    if needed > left:
        pytest.skip(f"its compilation takes about {needed:.0f} s (estimated), {left:.0f} s of the budget are left")


@pytest.fixture(autouse=True)
def _release_device_memory():
    yield
    if harness.ON_GPU:
        torch.cuda.empty_cache()


def pytest_terminal_summary(terminalreporter, config):
    rows = harness.RESULTS
    if not rows and not harness.PROFILES:
        return
    terminalreporter.section("lfm benchmarks")
    terminalreporter.write_line(format_tables(rows))
    terminalreporter.write_line("")
    terminalreporter.write_line(format_goals(rows))
    if harness.PROFILES:
        terminalreporter.write_line("\n" + format_profiles(harness.PROFILES, rows))
    terminalreporter.write_line(f"\n{len(rows)} rows in {time.time() - STARTED:.0f} s")
