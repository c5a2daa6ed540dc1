"""Every Triton kernel compiles for sm_80 and sm_90 with nothing in local memory (no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="triton's CUDA toolchain ships for Linux")


def test_compile_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = ("import sys; from lfm_kernels.compile_report import main, package_kernels; "
              "print('KERNELS', ' '.join(sorted(package_kernels()))); sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    kernels = result.stdout.splitlines()[0].split()[1:]
    assert len(kernels) >= 15
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["kernels"]
    for kernel in kernels:
        for target in ("sm_80", "sm_90"):
            mine = [r for r in rows if r["kernel"] == kernel and r["target"] == target]
            assert mine, f"{kernel} missing for {target}"
            # Read from the cubins Triton built: no stack, no local memory, no STL/LDL (spills).
            assert all(r["stack"] == r["local"] == r["local_ops"] == 0 for r in mine), mine
            assert all(1 <= r["ctas_per_sm"] and r["warps_per_sm"] <= 64 for r in mine), mine
            assert (tmp_path / f"{kernel}-{mine[0]['variant']}-{target}.cubin").stat().st_size > 0
    # Both float32 precisions are compiled; TF32 and 16-bit convs and scoring run on tensor cores.
    assert {r["precision"] for r in rows if r["kernel"] == "_snet_block_fwd_kernel"} == {"tf32", "ieee", "-"}
    assert any(r["kernel"] == "_score_topk_chunk_kernel" and r["variant"].startswith("bf16") and r["mma"] != "none"
               for r in rows)
    conv_kernels = {"_snet_block_fwd_kernel", "_snet_block_bwd_kernel", "_conv2x2_dx_kernel", "_conv2x2_dw_kernel",
                    "_snet_head_kernel"}
    assert conv_kernels <= set(kernels)
    conv_rows = [r for r in rows if r["kernel"] in conv_kernels and r["precision"] != "ieee"]
    assert conv_rows and all(r["mma"] != "none" for r in conv_rows), conv_rows
    hopper = [r for r in conv_rows if r["target"] == "sm_90"]
    assert hopper and all(r["mma"] == "HGMMA" for r in hopper), hopper
    # Every launch of LFM's inference at batches 1, 8, 32 and 256; at 1 and 8 each gives every SM a program.
    launches = report["eval_waves"]
    for target, sms in (("sm_80", 108), ("sm_90", 132)):
        for batch in (1, 8, 32, 256):
            stages = [w["stage"] for w in launches if w["target"] == target and w["batch"] == batch]
            assert stages[:4] == ["stem", "block 2", "block 3", "head"], stages
        small = [w for w in launches if w["target"] == target and w["batch"] in (1, 8)]
        assert small and all(w["programs"] >= sms and w["sms_filled"] >= 1 for w in small), small
