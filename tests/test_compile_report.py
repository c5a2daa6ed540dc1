"""Every Triton kernel compiles for sm_80 and sm_90 with zero register spills (no GPU needed)."""
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
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    kernels = lines[0].split()[1:]
    assert len(kernels) >= 14
    rows = [line.split() for line in lines if line.startswith("_")]
    for kernel in kernels:
        for target in ("sm_80", "sm_90"):
            mine = [r for r in rows if r[0] == kernel and r[2] == target]
            assert mine, f"{kernel} missing for {target}"
            assert all(int(r[4]) == 0 for r in mine), mine  # spill bytes
            assert (tmp_path / f"{kernel}-{mine[0][1]}-{target}.cubin").stat().st_size > 0
    # The scoring GEMM runs on tensor cores for 16-bit inputs; every SNet conv kernel in every variant
    # (TF32 for float32, bf16) does on sm_90.
    assert any(r[0] == "_score_topk_chunk_kernel" and r[1].startswith("bf16") and r[-1] == "yes" for r in rows)
    conv_kernels = {"_snet_block_fwd_kernel", "_snet_block_bwd_kernel", "_conv2x2_dx_kernel", "_conv2x2_dw_kernel",
                    "_snet_head_kernel"}
    assert conv_kernels <= set(kernels)
    conv_rows = [r for r in rows if r[0] in conv_kernels and r[2] == "sm_90"]
    assert conv_rows and all(r[-1] == "yes" for r in conv_rows), conv_rows
