"""lfm predict's CUDA-graph path (lfm.engines.CudaGraphRunner): replays give the model's logits."""
import pytest
import torch

from lfm import LFM
from lfm.engines import CudaGraphRunner, prepare

pytestmark = pytest.mark.gpu


def test_replays_match_the_model_per_shape_and_fall_back_past_the_cap(official):
    model = LFM(backend="triton").cuda().eval()
    model.load_state_dict(official["state_dict"])
    runner = prepare(model, "torch", torch.device("cuda"), (256, 256), "predict")
    assert isinstance(runner, CudaGraphRunner)
    x = official["outputs"]["x256"].cuda()
    with torch.no_grad():
        for batch in (1, 3, 1):
            got, want = runner(x[:batch]), model(x[:batch])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert len(runner.graphs) == 2
        runner.MAX_GRAPHS = 2
        torch.testing.assert_close(runner(x[:2]), model(x[:2]), atol=1e-5, rtol=0)
    assert len(runner.graphs) == 2
    ref = official["outputs"]["logits256"]
    torch.testing.assert_close(runner(x).cpu(), ref, atol=1e-2, rtol=0)  # TF32 by default, as cuDNN
