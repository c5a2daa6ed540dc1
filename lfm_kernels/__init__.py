"""Fused Triton kernels for LFM, each a torch op with autograd and a pure-PyTorch reference."""
from . import nn
from .backend import BACKENDS, resolve_backend
from .fuse import fuse
from .npr_residual import npr_residual, npr_residual_reference
from .random_k_pool import random_k_pool, random_k_pool_reference
from .score_topk import score_topk, score_topk_reference
from .snet_block import snet_block, snet_block_reference
from .snet_head import snet_head, snet_head_reference
from .topk_pool import topk_pool, topk_pool_reference

__all__ = [
    "BACKENDS", "fuse", "nn", "npr_residual", "npr_residual_reference", "random_k_pool", "random_k_pool_reference",
    "resolve_backend", "score_topk", "score_topk_reference", "snet_block", "snet_block_reference", "snet_head",
    "snet_head_reference", "topk_pool", "topk_pool_reference",
]
