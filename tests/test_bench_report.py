"""The benchmark report (bench/report.py): derived figures, goal verdicts, tables, kernel profiles, rendering a
results file; bench_kernel_profile's kernel times on CPU."""
import pytest
import torch

from bench import results
from bench.bench_kernel_profile import kernel_times
from bench.report import (
    HOST_TIME_GROUP,
    INFERENCE_GROUP,
    PEAK_GROUP,
    TRAINING_GROUP,
    derived,
    format_profiles,
    format_tables,
    goal_checks,
    measured_peaks,
    write_report,
)


def row(group, op, provider, dtype, median_s, bytes=0, flops=0, batch=32, size=256, mode="inference",
        peak_bytes=None):
    return dict(group=group, op=op, provider=provider, dtype=dtype, batch=batch, size=size, mode=mode,
                bytes=bytes, flops=flops, images=batch if group != PEAK_GROUP else 0, median_s=median_s,
                q1_s=0.9 * median_s, q3_s=1.2 * median_s, rounds=5, iterations=1, warmup_s=1.0, peak_bytes=peak_bytes,
                test=f"bench/bench_x.py::test[{provider}-{dtype}-{batch}]")


MIB = 2**20
ROWS = [
    row(PEAK_GROUP, "copy", "torch", "float32", 1e-3, bytes=2 * 10**9, mode="device copy"),  # 2 TB/s
    row(PEAK_GROUP, "matmul", "torch", "float32", 1e-2, flops=10**12, mode="tf32"),  # 100 TFLOP/s
    row(PEAK_GROUP, "matmul", "torch", "bfloat16", 5e-3, flops=10**12, mode="tensor cores"),  # 200 TFLOP/s
    row(INFERENCE_GROUP, "lfm", "eager", "float32", 10e-3, flops=10**11, batch=256),
    row(INFERENCE_GROUP, "lfm", "compile-default", "float32", 2.5e-3, flops=10**11, batch=256),
    row(INFERENCE_GROUP, "lfm", "compile-max-autotune", "float32", 2e-3, flops=10**11, batch=256),
    row(INFERENCE_GROUP, "lfm", "triton", "float32", 1.5e-3, flops=10**11, batch=256),
    row("op: topk_pool", "topk_pool", "triton", "float32", 0.6e-3, bytes=10**9, mode="forward"),
    row("op: random_k_pool", "random_k_pool", "triton", "float32", 20e-6, bytes=10**5, mode="forward"),
    row("op: snet_block2", "snet_block2", "triton", "float32", 1e-3, bytes=10**8, flops=5 * 10**10, mode="forward"),
    row(INFERENCE_GROUP, "lfm", "triton", "float32", 0.25e-3, flops=10**10, batch=32),  # 7.8 us per image
    row(TRAINING_GROUP, "lfm", "eager", "float32", 20e-3, size=224, mode="training step", peak_bytes=900 * MIB),
    row(TRAINING_GROUP, "lfm", "compile-default", "float32", 10e-3, size=224, mode="training step",
        peak_bytes=700 * MIB),
    row(TRAINING_GROUP, "lfm", "triton", "float32", 4e-3, size=224, mode="training step", peak_bytes=240 * MIB),
    row("op: snet_block2", "snet_block2", "eager", "float32", 2e-3, bytes=10**8, flops=5 * 10**10, mode="forward"),
]


def test_peaks_and_derived_figures():
    peaks = measured_peaks(ROWS)
    assert peaks == pytest.approx({"copy": 2e12, "float32": 1e14, "bfloat16": 2e14})
    topk = derived(ROWS[7], peaks)
    assert topk["gb_s"] == pytest.approx(1e9 / 0.6e-3 / 1e9)
    assert topk["bw_share"] == pytest.approx(1e9 / 0.6e-3 / 2e12)
    assert topk["bound"] == "memory"
    assert derived(ROWS[8], peaks)["bound"] == "latency"  # 0.05 us of traffic at 2 TB/s
    snet = derived(ROWS[9], peaks)
    assert snet["bound"] == "compute" and snet["roofline"] == pytest.approx(5e10 / 1e14 / 1e-3)
    assert derived(ROWS[3], peaks)["images_s"] == pytest.approx(25600)


def test_goal_verdicts():
    checks = {goal: (verdict, detail) for goal, verdict, detail in goal_checks(ROWS)}
    assert checks["inference 256x256 batch 256, triton float32 >= 5x eager float32"] == ("PASS", "6.67x")
    assert checks["inference 256x256 batch 256, triton float32 >= 2x best torch.compile float32"] == ("FAIL", "1.33x")
    # Per image at batch 32 (7.8 us) against batch 256 (5.9 us).
    assert checks["inference 256x256 triton float32: batch 32 >= 80% of batch 256's images/s"] == ("FAIL", "0.75x")
    assert checks["training step triton float32 >= 2x compile-default float32"] == ("PASS", "2.50x")
    assert checks["training step triton float32: peak memory <= 0.33x eager's"] == (
        "PASS", "240 MiB against 900 MiB = 0.27x")
    memory_goals = [g for g in checks if "copy bandwidth" in g]
    assert memory_goals == ["topk_pool forward float32 batch 32: memory-bound kernel >= 70% of copy bandwidth"]
    assert checks[memory_goals[0]] == ("PASS", "1667 GB/s = 83%")
    conv = "snet_block2 forward float32 batch 32"
    assert checks[f"{conv}: SNet conv >= 50% of the float32 matmul peak"] == ("PASS", "50 TFLOP/s = 50%")
    assert checks[f"{conv}: triton at least as fast as eager"] == ("PASS", "2.00x")
    assert checks["topk_pool forward float32 batch 32: triton at least as fast as eager"][0] == "NOT MEASURED"


def test_goals_of_a_run_without_peak_memory_or_anchors_are_not_measured():
    rows = [dict(r, peak_bytes=None) if r["group"] == TRAINING_GROUP else r for r in ROWS
            if r["provider"] != "compile-default" or r["group"] != TRAINING_GROUP]
    checks = {goal: verdict for goal, verdict, _ in goal_checks(rows)}
    assert checks["training step triton float32 >= 2x compile-default float32"] == "NOT MEASURED"
    assert checks["training step triton float32: peak memory <= 0.33x eager's"] == "NOT MEASURED"


def test_training_host_time_is_set_against_the_step_of_its_run():
    host = dict(row(HOST_TIME_GROUP, "lfm", "triton", "float32", 3e-3, size=224,
                    mode="training step host, launches stubbed"), launches=74)
    goal = ("training step triton float32 batch 32: host time (launches stubbed out) below the measured step time "
            "(not host-bound)")
    checks = {g: (verdict, detail) for g, verdict, detail in goal_checks(ROWS + [host])}
    assert checks[goal] == ("PASS", "3.00 ms, 74 launches per step against a step of 4.00 ms")
    checks = {g: verdict for g, verdict, _ in goal_checks([r for r in ROWS if r["group"] != TRAINING_GROUP] + [host])}
    assert checks[goal] == "NOT MEASURED"
    slow = dict(host, median_s=5e-3)
    assert {g: verdict for g, verdict, _ in goal_checks(ROWS + [slow])}[goal] == "FAIL"


def test_tables_show_speedup_over_eager_and_the_interquartile_range():
    table = format_tables(ROWS)
    assert "Measured peaks: copy 2000 GB/s, float32 matmul 100.0 TFLOP/s, bfloat16 matmul 200.0 TFLOP/s" in table
    triton = next(line for line in table.splitlines() if "| lfm | inference | float32 | 256 | 256 | triton |" in line)
    assert "| 1.500 | 0.450 | 170,667 | 6.67 |" in triton  # median ms, IQR ms, images/s, x eager
    training = next(line for line in table.splitlines() if "| training step | float32 | 32 | 224 | triton |" in line)
    assert training.endswith("| 5.00 | 0.0 | 0 | 0.00 | 0 | 0 | latency | 240 |")  # x eager ... peak MiB


HEADER = dict(weights="RANDOM WEIGHTS: not found", random_weights=True, budget_s=450,
              environment=dict(device="NVIDIA H200", date="2026-12-01", torch="2.11", triton="3.6", cuda="13.0",
                               python="3.12", commit="abc1234", cudnn_benchmark=True, cudnn_allow_tf32=True))


def test_report_of_a_results_file(tmp_path):
    path = tmp_path / "nvidia-h200-2026-12-01-120000.jsonl"
    results.create(path, HEADER)
    results.append(path, dict(kind="test", test="tests/test_gpu.py::test_a", tier="smoke", outcome="failed",
                              reason="AssertionError: norm-relative error", duration_s=1.5))
    results.append(path, dict(kind="tier", tier="smoke", status="done", duration_s=80.2))
    for r in ROWS:
        results.append(path, dict(kind="row", **r))
    results.append(path, dict(kind="profile", **profile()))
    results.append(path, dict(kind="test", test="bench/bench_x.py::test[compile-max-autotune]",
                              tier="compile-max-autotune", outcome="skipped",
                              reason="its compilation takes about 150 s (estimated)"))
    results.append(path, dict(kind="tier", tier="compile-max-autotune", status="skipped", reason="the budget is spent"))
    with open(path, "a") as f:
        f.write('{"kind": "row", "op": "cut by a ki')  # a kill in the middle of a write
    loaded = results.load(path)
    assert loaded["rows"] == ROWS and loaded["profiles"] == [profile()] and loaded["header"]["budget_s"] == 450
    write_report(path)
    markdown = path.with_suffix(".md").read_text()
    assert markdown.index("**WARNING: RANDOM WEIGHTS: not found**") < markdown.index("### Goals")
    assert "commit abc1234" in markdown and "smoke 80 s, compile-max-autotune skipped (the budget is spent)" in markdown
    assert "| `tests/test_gpu.py::test_a` | failed | 1.5 | AssertionError: norm-relative error |" in markdown
    assert "- `bench/bench_x.py::test[compile-max-autotune]`: skipped: its compilation takes about 150 s" in markdown
    assert markdown.index("### Where the device time goes") > markdown.index("### lfm inference")
    assert "| `_kernel_13` | 2 | 0.140 | 13.3% |" in markdown
    assert path.with_suffix(".png").stat().st_size > 1000


def profile(provider="triton", dtype="float32", batch=256, kernels=14):
    """A profile record as bench_kernel_profile makes it: kernel i takes (i + 1) * 10 us per call, twice."""
    listed = [dict(name=f"_kernel_{i}" if i else "sm90_xmma_fprop_" + "x" * 200, launches=2, seconds=(i + 1) * 1e-5)
              for i in reversed(range(kernels))]
    return dict(op="lfm", provider=provider, dtype=dtype, batch=batch, size=256, mode="inference", device="cuda",
                calls=5, total_s=sum(k["seconds"] for k in listed), kernels=listed, test="bench/x.py::test")


def test_profiles_show_the_longest_kernels_and_the_busy_share_of_the_timed_call():
    text = format_profiles([profile()], ROWS)
    lines = text.splitlines()
    assert lines[0] == "#### lfm inference, triton float32, batch 256, 256x256 (5 calls profiled)"
    assert "device busy 1.050 ms per call, 70% of the timed median 1.500 ms" in lines
    table = [line for line in lines if line.startswith("| ")][1:]
    assert table[0] == "| `_kernel_13` | 2 | 0.140 | 13.3% |"
    assert len(table) == 13 and table[-1] == "| 2 more | 4 | 0.030 | 2.9% |"  # 20 us + 10 us
    assert all(len(line) < 140 for line in lines)  # cuDNN's long names cut
    untimed = format_profiles([profile(dtype="bfloat16")], ROWS)
    assert "device busy 1.050 ms per call\n" in untimed  # no timed row of that case


def test_kernel_times_count_launches_per_call_longest_first():
    a = torch.randn(256, 256)

    def step(x):
        torch.mm(torch.mm(x, x), x).add_(1.0)

    kernels = kernel_times(step, [(a,), (a.clone(),)], calls=3)
    by_name = {name: (launches, seconds) for name, launches, seconds in kernels}
    assert by_name["aten::mm"][0] == 2 and by_name["aten::add_"][0] == 1
    assert all(seconds > 0 for _, _, seconds in kernels)
    assert [seconds for _, _, seconds in kernels] == sorted((seconds for _, _, seconds in kernels), reverse=True)
