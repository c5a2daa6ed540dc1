"""bench.compile_report: LFM's Triton launches compiled for sm_80 and sm_90 without a GPU.

The default tier parses SASS and resource dumps, checks the CLI's refusals and compiles one GEMM launch of a
real forward for sm_90 through the report's own path; the full sweep over every launch is slow."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="triton's CUDA toolchain ships for Linux")

SASS = """
        /*0100*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR6][R2.64] ;
        /*0110*/                   HGMMA.64x32x8.F32.TF32 R24, gdesc[UR4], RZ, !UPT ;
        /*0120*/                   HGMMA.64x128x8.F32.TF32 R24, gdesc[UR8], R24 ;
        /*0128*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0130*/                   STL.64 [R1+0x8], R24 ;
        /*0140*/                   LDL.64 R24, [R1+0x8] ;
        /*0150*/                   LDL R26, [R1+0x10] ;
"""


def test_sass_facts_read_the_widest_wgmma_the_loads_and_the_spills():
    from bench.compile_report import sass_facts

    assert sass_facts(SASS) == {"local_ops": 3, "mma": "HGMMA", "wgmma": "64x128x8", "in_flight": 1,
                                "loads": "cp.async"}
    tma = "UTMALDG.2D [UR8], [UR4] ;\nLDGSTS.E [R5], [R2.64] ;\nHMMA.16816.F32.BF16 R4, R8, R12, R4 ;"
    assert sass_facts(tma) == {"local_ops": 0, "mma": "HMMA", "wgmma": "-", "in_flight": "-", "loads": "TMA"}
    # Every wgmma group waited for before the next is issued (a dot Triton made synchronous, or one ptxas
    # serialized): nothing in flight.
    serialized = SASS.replace("0x1 ;", "0x0 ;") + "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n"
    assert sass_facts(serialized)["in_flight"] == 0
    assert sass_facts("LDG.E R2, [R4.64] ;\nFFMA R3, R2, R2, R3 ;")["loads"] == "sync"


def test_resources_and_occupancy():
    from bench.compile_report import cubin_resources, occupancy

    usage = "Resource usage:\n Function _k:\n  REG:168 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:560 TEXTURE:0"
    assert cubin_resources(usage) == {"regs": 168, "stack": 16, "local": 8}
    # 168 registers x 32 threads round up to 5376 per warp: 8 warps take 43008, one CTA of 65536 fits.
    assert occupancy(168, 0, 8, 90) == (1, 8)
    # 40 KiB of shared memory per CTA: 5 fit in sm_90's 228 KiB, 4 in sm_80's 164 KiB.
    assert occupancy(32, 40 * 1024, 4, 90) == (5, 20) and occupancy(32, 40 * 1024, 4, 80) == (4, 16)


def _row(**fields):
    row = {"kernel": "_k", "variant": "fp32-tf32.1", "target": "sm_90", "dot": "tf32", "stages": 3, "stack": 0,
           "local": 0, "local_ops": 0, "mma": "HGMMA", "wgmma": "64x128x8", "in_flight": 1, "loads": "cp.async"}
    return row | fields


def test_structure_is_reported_and_only_a_missing_wgmma_fails():
    from bench.compile_report import row_failure, structure_notes

    assert structure_notes(_row()) == [] and row_failure(_row()) is None
    narrow = _row(wgmma="64x32x8", in_flight=0, stages=1, loads="sync", local_ops=4)
    assert structure_notes(narrow) == ["N<64", "wgmma sync", "stages<3", "sync loads", "spills"]
    assert row_failure(narrow) is None  # spills and a narrow, unpipelined GEMM are reported, not failed
    assert row_failure(_row(mma="HMMA", wgmma="-")) == "tf32 dots without HGMMA on sm_90"
    assert row_failure(_row(dot="16-bit", mma="none", wgmma="-")) is not None
    # Full-float32 dots run on FMA units, and sm_80 has no wgmma: neither needs HGMMA nor gets GEMM notes.
    assert row_failure(_row(dot="ieee", mma="none", wgmma="-")) is None
    assert structure_notes(_row(target="sm_80", mma="HMMA", wgmma="-", in_flight="-", stages=1, loads="sync")) == []
    assert row_failure({"error": "boom"}) == "compile error: boom"
    # The scoring's GEMMs are held to it as the convs are.
    scoring = _row(kernel="_score_topk_dfeat_kernel", mma="HMMA", wgmma="-")
    assert row_failure(scoring) == "tf32 dots without HGMMA on sm_90" and structure_notes(scoring)[0] == "no HGMMA"


def _run(args, **env):
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bench.compile_report", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=base | {"PYTHONPATH": str(REPO)} | env)


def test_refuses_the_interpreter_and_a_folder_it_did_not_fill(tmp_path):
    out = _run([str(tmp_path / "new")], TRITON_INTERPRET="1")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "python -m bench.compile_report: error: unset TRITON_INTERPRET (it replaces the kernels with the interpreter)"]
    assert not (tmp_path / "new").exists()
    (tmp_path / "notes.txt").write_text("mine")
    out = _run([str(tmp_path)])
    assert out.returncode == 2 and "holds files that are not an earlier compile report" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    out = _run([str(tmp_path / "new"), "--targets", "75"])
    assert out.returncode == 2 and "--targets" in out.stderr and "Traceback" not in out.stderr


ONE_GEMM = """
import json, sys
from pathlib import Path
import torch
from bench import compile_report as report
from bench.workloads import inference, lfm_model
from lfm_kernels import configs

launches = []
model = lfm_model(torch.bfloat16, "cpu")
with report.launches_as("sm90"), configs.observe_launches(launches.append, run=False):
    inference(model, 1)
head = next(launch for launch in launches if launch.name == "_snet_head_partial_kernel")  # split at batch 1
head.meta["enable_fp_fusion"] = False  # the launch's own compile options reach triton.compile
compiled = report.compile_launch(head, 90)
row = report.report_row((report.Recorded(head, "bf16"), 90, Path(sys.argv[1]), "bf16.1"))
print(json.dumps({"row": row, "meta": {k: str(v) for k, v in head.meta.items()}, "args": len(head.args),
                  "fp_fusion": compiled.metadata.enable_fp_fusion}))
"""


def test_one_gemm_launch_of_a_real_forward_compiles_for_sm_90(tmp_path):
    """The head kernel of LFM's bfloat16 inference at batch 1, recorded with launches stubbed out and
    compiled for sm_90 with its own options: bfloat16 dots run as wgmma (K = 16 per 16-bit HGMMA)."""
    out = subprocess.run([sys.executable, "-c", ONE_GEMM, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
                         | {"PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    row, meta = result["row"], result["meta"]
    assert result["fp_fusion"] is False
    # As a GPU launches it: bfloat16 operands given to tl.dot as bfloat16 (not the interpreter's float32).
    assert meta["DOT_DTYPE"] == "bf16"
    assert (row["dot"], row["mma"], row["target"]) == ("16-bit", "HGMMA", "sm_90")
    m, n, k = map(int, row["wgmma"].split("x"))
    assert m == 64 and k == 16 and n % 8 == 0 and 8 <= n <= 256
    assert row["in_flight"] >= 1  # the block-4 conv's K loop keeps a wgmma group in flight (one dot per step)
    assert row["warps"] == int(meta["num_warps"]) and row["stages"] == int(meta["num_stages"])
    assert 0 < row["regs"] <= 255 and row["ctas_per_sm"] >= 1
    assert (tmp_path / "_snet_head_partial_kernel-bf16.1-sm_90.cubin").stat().st_size > 0


@pytest.mark.slow
def test_full_report(tmp_path):
    """Every launch of LFM's workloads for sm_80 and sm_90 (minutes on 2 cores)."""
    out = _run([str(tmp_path), "--targets", "80,90"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert out.returncode == 0, "\n".join(report["failures"]) + out.stderr[-2000:]
    check_full_report(report)


def check_full_report(report: dict):
    rows, kernels = report["kernels"], report["package_kernels"]  # found in the report's process: real JIT kernels
    assert len(kernels) >= 15
    for kernel in kernels:
        for target in ("sm_80", "sm_90"):
            assert [r for r in rows if r["kernel"] == kernel and r["target"] == target], (kernel, target)
    # Both float32 precisions and bfloat16 are compiled; every launch with TF32 or 16-bit dots runs wgmma on sm_90.
    assert {r["dot"] for r in rows} == {"-", "tf32", "ieee", "16-bit"}
    hopper = [r for r in rows if r["target"] == "sm_90" and r["dot"] in ("tf32", "16-bit")]
    assert hopper and all(r["mma"] == "HGMMA" and r["wgmma"] != "-" for r in hopper), hopper
    # Each keeps a wgmma group in flight across its K steps, but for the stem's 16-bit training GEMMs (the
    # conv with its statistics, and once more in the backward), which have one K step (3 channels x 4 taps).
    sync = [r for r in hopper if r["in_flight"] == 0]
    assert len(sync) <= 2 and {r["kernel"] for r in sync} <= {"_snet_block_stats_kernel",
                                                               "_snet_block_dy_sums_kernel"}, sync
    assert all(r["ctas_per_sm"] >= 1 for r in rows), [r for r in rows if r["ctas_per_sm"] < 1]
    # Every launch of LFM's inference at each batch, block by block; at 1 and 8 each gives every SM a program.
    waves = report["eval_waves"]
    for target, sms in (("sm_80", 108), ("sm_90", 132)):
        for batch in (1, 8, 32, 256):
            stages = [w["stage"] for w in waves if w["target"] == target and w["batch"] == batch]
            assert stages[:3] == ["block 1", "block 2", "block 3"] and stages[3:] and set(stages[3:]) == {"head"}
        small = [w for w in waves if w["target"] == target and w["batch"] in (1, 8)]
        assert small and all(w["programs"] >= sms for w in small), small


def test_recorded_launches_are_distinct_per_variant():
    """Launches that differ only in their arguments' values are one compiled kernel; a different dtype is another."""
    from bench.compile_report import launch_key
    from lfm_kernels.configs import Launch

    kernel = type("K", (), {"__name__": "_k"})
    a = Launch(kernel, (4,), (torch.empty(2), 3, 0.5), {"BLOCK": 16, "num_warps": 4})
    assert launch_key(a) == launch_key(Launch(kernel, (9,), (torch.empty(7), 5, 1.5), {"num_warps": 4, "BLOCK": 16}))
    assert launch_key(a) != launch_key(Launch(kernel, (4,), (torch.empty(2, dtype=torch.bfloat16), 3, 0.5),
                                              {"BLOCK": 16, "num_warps": 4}))
    assert launch_key(a) != launch_key(Launch(kernel, (4,), (torch.empty(2), 3, 0.5), {"BLOCK": 32, "num_warps": 4}))
