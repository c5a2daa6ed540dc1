"""Weight preprocessing done once where the weights cannot change: for a CUDA graph's capture.

The ops derive tensors from parameters on every call (the GEMM kernels' packed weights, the cuDNN
composition's BatchNorm-folded weights), so that no update of the parameters (an optimizer step, a `.data`
write) can leave a stale copy. Inside `frozen_weights(memo)` each derived tensor is computed once into
`memo` and returned again on later calls with the same tensors: the warm-up of a CUDA graph fills it, and
the captured graph then replays the forward's kernels only, without the 4 weight copies (our kernels) or
the 36 small kernels of BatchNorm folding (the cuDNN composition) of each LFM forward. The graph reads the
memo's tensors: keep the memo as long as the graph, and do not change the weights while it is replayed
(inference).
"""
import contextlib

import torch

_memo = None  # the active frozen_weights memo, else None


@contextlib.contextmanager
def frozen_weights(memo: dict):
    """Within: `preprocessed` computes each derived tensor once into `memo`, {key: (arguments, result)}."""
    global _memo
    previous, _memo = _memo, memo
    try:
        yield memo
    finally:
        _memo = previous


def preprocessed(fn, *args):
    """fn(*args) for a function of weights (parameters, buffers) and constants: on every call, or, inside
    frozen_weights, once per fn, tensor identities and constants. The memo keeps the arguments, so that
    the identities it is keyed on are not reused by other tensors while it lives."""
    if _memo is None:
        return fn(*args)
    key = (fn, *(("tensor", id(a)) if isinstance(a, torch.Tensor) else a for a in args))
    hit = _memo.get(key)
    if hit is None:
        hit = _memo[key] = (args, fn(*args))
    return hit[1]
