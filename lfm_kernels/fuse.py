"""fuse(model): swap the eager LFM patterns of a model for the fused modules of lfm_kernels.nn, with torch.fx.

A deep copy of `model` is traced (the modules of lfm_kernels.nn stay leaves, so fusing twice is harmless)
and two patterns are rewritten:

  (a) Conv2d(kernel_size=2) -> BatchNorm2d -> ReLU [-> 2x2 max-pool]         =>  SNetBlock(pool=True/False)
      ReLU: an nn.ReLU module, F.relu / torch.relu (in place or not) or Tensor.relu.
      Max-pool: an nn.MaxPool2d module, F.max_pool2d or torch.max_pool2d. When none follows the ReLU
      (or one the rules below reject), the block gets pool=False and what follows stays in the graph.
  (b) bias-free 1x1 Conv2d -> positions flattened -> torch.topk(..., k, dim=-1)  =>  ScoreTopK(k)
      Flattening: x.flatten(2) / torch.flatten(x, 2), or x.view(B, C, -1) / x.reshape(B, C, -1) with B and
      C read from x.shape or x.size(); the values taken as topk(...)[0] or topk(...).values.

Strictness: a pattern is rewritten only where the fused module computes exactly what the graph does;
anything else is left as it is.
  - No intermediate value has a user outside the pattern. The only extra uses allowed are reads of the
    score map's shape that serve its view, and Top-K indices that nothing uses.
  - Modules are exactly nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d (a subclass may compute
    something else), called on the pattern's value alone.
  - Conv: stride 1, no padding, dilation 1, groups 1; for (b) without a bias. BatchNorm: affine with
    running statistics.
    Max-pool: 2x2 window, stride 2, no padding, dilation 1, floor mode, no indices. Top-K: largest,
    sorted, over the flattened positions, with a constant k.

The fused modules hold the very Conv2d, BatchNorm2d (and ReLU) modules they replace, so parameters,
buffers, eps and momentum carry over, and they take the place of what they replace so that state_dict
keys stay the same: SNetBlock that of a container whose only children are "0" conv, "1" BatchNorm
[, "2" ReLU] (the nn.Sequential block of the authors' code), ScoreTopK that of its conv. Where that place
is used by another node, the fused module goes to a new sibling "<conv name>_fused" instead.
"""
import copy
import inspect
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .backend import check_backend_name
from .nn import ScoreTopK, SNetBlock


def _signature(*required, **optional) -> inspect.Signature:
    """A Python signature to bind a traced call's args and kwargs against (torch builtins have none)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(name, kind) for name in required]
                             + [inspect.Parameter(name, kind, default=value) for name, value in optional.items()])


_RELU = _signature("input", inplace=False)
_MAX_POOL2D = _signature("input", "kernel_size", stride=None, padding=0, dilation=1, ceil_mode=False,
                         return_indices=False)
_FLATTEN = _signature("input", start_dim=0, end_dim=-1)
_SIZE = _signature("input", dim=None)
_TOPK = _signature("input", "k", dim=-1, largest=True, sorted=True)


def fuse(model: nn.Module, backend=None) -> fx.GraphModule:
    """A GraphModule computing what `model` computes, with patterns (a) and (b) fused (see the module
    docstring). `model` must be symbolically traceable (no control flow on tensor values) and is not
    modified. `backend` ("auto", "torch", "triton"; None reads LFM_BACKEND) goes to every fused module."""
    if backend is not None:
        check_backend_name(backend)
    gm = _traced_copy(model)
    # All matches are found before any rewrite; they never share a node (each starts at its own conv).
    snet_blocks = [match for match in (_match_snet_block(gm, node) for node in gm.graph.nodes) if match]
    score_topks = [match for match in (_match_score_topk(gm, node) for node in gm.graph.nodes) if match]
    for match in snet_blocks:
        _fuse_snet_block(gm, match, backend)
    for match in score_topks:
        _fuse_score_topk(gm, match, backend)
    gm.graph.lint()
    gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """Keeps the modules of lfm_kernels.nn as leaves: their forward checks real tensors."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return type(module).__module__ == SNetBlock.__module__ or super().is_leaf_module(module, qualname)


def _traced_copy(model: nn.Module) -> fx.GraphModule:
    model = copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        return model
    return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)


# ---------------------------------------------------------------------------------------------
# Node predicates
# ---------------------------------------------------------------------------------------------
def _called_module(gm: fx.GraphModule, node, cls):
    """The module `node` calls on one value when it is exactly a `cls`, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    module = gm.get_submodule(node.target)
    return module if type(module) is cls else None


def _calls(node: fx.Node, functions=(), methods=()) -> bool:
    return ((node.op == "call_function" and node.target in functions)
            or (node.op == "call_method" and node.target in methods))


def _arguments(signature: inspect.Signature, node: fx.Node):
    """The call's arguments by name, defaults filled in; None when they do not fit the signature."""
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


def _sole_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _pair(value):
    """(a, b) from an int or a 2-sequence, the way pooling arguments are given; None for anything else."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return tuple(value)
    return None


def _is_plain_conv(conv: nn.Conv2d, kernel_size: int) -> bool:
    """A square kernel of that size, stride 1, no padding, dilation 1, one group."""
    return (conv.kernel_size == (kernel_size, kernel_size) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1)


def _is_relu_of(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> bool:
    if node.op == "call_module":
        return _called_module(gm, node, nn.ReLU) is not None and node.args[0] is x
    if not _calls(node, (F.relu, F.relu_, torch.relu, torch.relu_), ("relu", "relu_")):
        return False
    args = _arguments(_RELU, node)
    return args is not None and args["input"] is x


def _is_2x2_pool(kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> bool:
    stride_is_window = stride is None or (isinstance(stride, (tuple, list)) and not stride) or _pair(stride) == (2, 2)
    return (_pair(kernel_size) == (2, 2) and stride_is_window and _pair(padding) == (0, 0)
            and _pair(dilation) == (1, 1) and ceil_mode is False and return_indices is False)


def _is_pool_of(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> bool:
    if node.op == "call_module":
        pool = _called_module(gm, node, nn.MaxPool2d)
        return (pool is not None and node.args[0] is x
                and _is_2x2_pool(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                                 pool.return_indices))
    if not _calls(node, (F.max_pool2d, torch.max_pool2d)):
        return False
    args = _arguments(_MAX_POOL2D, node)
    return args is not None and args.pop("input") is x and _is_2x2_pool(**args)


def _size_arguments(node: fx.Node):
    """The arguments of an x.size(...) call, else None."""
    return _arguments(_SIZE, node) if node.op == "call_method" and node.target == "size" else None


def _reads_shape_of(node: fx.Node, x: fx.Node) -> bool:
    """x.shape, x.size() or x.size(dim)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args == (x, "shape")
    args = _size_arguments(node)
    return args is not None and args["input"] is x


def _is_whole_shape_of(node, x: fx.Node) -> bool:
    """x.shape or x.size()."""
    if not isinstance(node, fx.Node) or not _reads_shape_of(node, x):
        return False
    args = _size_arguments(node)
    return args is None or args["dim"] is None


def _is_dim_of(node, x: fx.Node, dim: int) -> bool:
    """x.shape[dim], x.size()[dim] or x.size(dim)."""
    if not isinstance(node, fx.Node):
        return False
    if _calls(node, (operator.getitem,)):
        shape, index = node.args
        return _is_whole_shape_of(shape, x) and type(index) is int and index == dim
    args = _size_arguments(node)
    return args is not None and args["input"] is x and type(args["dim"]) is int and args["dim"] == dim


def _is_position_flatten(node: fx.Node, x: fx.Node) -> bool:
    """x (B, C, H, W) -> (B, C, H*W): x.flatten(2), torch.flatten(x, 2), x.view(B, C, -1), x.reshape(B, C, -1)."""
    if _calls(node, (torch.flatten,), ("flatten",)):
        args = _arguments(_FLATTEN, node)
        return args is not None and args["input"] is x and args["start_dim"] == 2 and args["end_dim"] in (-1, 3)
    if not _calls(node, (torch.reshape,), ("view", "reshape")) or node.kwargs or node.args[0] is not x:
        return False
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return (len(shape) == 3 and _is_dim_of(shape[0], x, 0) and _is_dim_of(shape[1], x, 1)
            and type(shape[2]) is int and shape[2] == -1)


def _is_field_of(node: fx.Node, result: fx.Node, index: int, name: str) -> bool:
    """result[index] or result.<name>, for a (values, indices) result."""
    return ((_calls(node, (operator.getitem,)) and node.args == (result, index))
            or (_calls(node, (getattr,)) and node.args == (result, name)))


# ---------------------------------------------------------------------------------------------
# Pattern (a): Conv2d(k=2) -> BatchNorm2d -> ReLU [-> max-pool 2x2]
# ---------------------------------------------------------------------------------------------
@dataclass
class _SNetBlockMatch:
    conv: fx.Node
    bn: fx.Node
    relu: fx.Node
    pool: fx.Node | None

    @property
    def nodes(self) -> list:
        return [node for node in (self.conv, self.bn, self.relu, self.pool) if node is not None]

    @property
    def output(self) -> fx.Node:
        return self.pool if self.pool is not None else self.relu


def _match_snet_block(gm: fx.GraphModule, conv_node: fx.Node):
    conv = _called_module(gm, conv_node, nn.Conv2d)
    if conv is None or not _is_plain_conv(conv, 2):
        return None
    bn_node = _sole_user(conv_node)
    bn = _called_module(gm, bn_node, nn.BatchNorm2d)
    if (bn is None or bn_node.args[0] is not conv_node or not (bn.affine and bn.track_running_stats)
            or bn.num_features != conv.out_channels):
        return None
    relu_node = _sole_user(bn_node)
    if relu_node is None or not _is_relu_of(gm, relu_node, bn_node):
        return None
    pool_node = _sole_user(relu_node)
    if pool_node is not None and not _is_pool_of(gm, pool_node, relu_node):
        pool_node = None
    return _SNetBlockMatch(conv_node, bn_node, relu_node, pool_node)


def _fuse_snet_block(gm: fx.GraphModule, match: _SNetBlockMatch, backend):
    conv, bn = gm.get_submodule(match.conv.target), gm.get_submodule(match.bn.target)
    block = SNetBlock(conv.in_channels, conv.out_channels, pool=match.pool is not None, backend=backend)
    children = {"0": match.conv.target, "1": match.bn.target}
    if match.relu.op == "call_module":
        children["2"] = match.relu.target
    for name, target in children.items():
        block.add_module(name, gm.get_submodule(target))
    block.train(bn.training)
    container = match.conv.target.rpartition(".")[0]
    if _can_replace_container(gm, container, children, match.nodes):
        path = container
    else:
        path = _unused_path(gm, match.conv.target + "_fused")
    # Old places of modules that now live in the block (or nowhere: a max-pool module), to drop if unused
    stale = [target for target in children.values() if not target.startswith(path + ".")]
    if match.pool is not None and match.pool.op == "call_module":
        stale.append(match.pool.target)
    _install(gm, path, block)
    _replace_nodes(gm.graph, match.conv, match.nodes, [match.output], path)
    _delete_unreferenced(gm, stale)


def _can_replace_container(gm: fx.GraphModule, path: str, children: dict, pattern: list) -> bool:
    """Whether the module at `path` holds the block's conv at "0", its BatchNorm at "1" and nothing else
    but its ReLU at "2", and no node outside the pattern refers to it: then the block can take its
    place and the state_dict keys stay the same."""
    if not path:
        return False
    container = gm.get_submodule(path)
    inside = {name for name, target in children.items() if target == f"{path}.{name}"}
    return ({"0", "1"} <= inside and set(container._modules) == inside
            and not container._parameters and not container._buffers
            and not _is_referenced(gm.graph, path, pattern))


# ---------------------------------------------------------------------------------------------
# Pattern (b): bias-free 1x1 Conv2d -> per-channel Top-K over the flattened positions
# ---------------------------------------------------------------------------------------------
@dataclass
class _ScoreTopKMatch:
    conv: fx.Node
    k: int
    values: list  # the nodes that read the Top-K values: the fused module's output replaces them
    nodes: list  # every node of the pattern, conv and values included


def _match_score_topk(gm: fx.GraphModule, conv_node: fx.Node):
    conv = _called_module(gm, conv_node, nn.Conv2d)
    if conv is None or not _is_plain_conv(conv, 1) or conv.bias is not None:
        return None
    flats = [user for user in conv_node.users if _is_position_flatten(user, conv_node)]
    if len(flats) != 1:
        return None
    shape_reads = _shape_reads_for(conv_node, flats[0])
    topk = _sole_user(flats[0])
    if shape_reads is None or topk is None or not _calls(topk, (torch.topk,), ("topk",)):
        return None
    args = _arguments(_TOPK, topk)
    if (args is None or args["input"] is not flats[0] or type(args["k"]) is not int or type(args["dim"]) is not int
            or args["dim"] not in (-1, 2) or args["largest"] is not True or args["sorted"] is not True):
        return None
    values = [user for user in topk.users if _is_field_of(user, topk, 0, "values")]
    unused_indices = [user for user in topk.users if _is_field_of(user, topk, 1, "indices") and not user.users]
    if not values or len(values) + len(unused_indices) != len(topk.users):
        return None
    return _ScoreTopKMatch(conv_node, args["k"], values,
                           [conv_node, *shape_reads, flats[0], topk, *values, *unused_indices])


def _shape_reads_for(x: fx.Node, flat: fx.Node):
    """The users of x other than `flat` when they only read x's shape for `flat` (or for nothing, as
    unused names of `B, C, H, W = x.shape` do), with the indexing nodes in between; else None."""
    reads = []
    for user in x.users:
        if user is flat:
            continue
        if not _reads_shape_of(user, x):
            return None
        items = [item for item in user.users if item is not flat]
        if not all(_calls(item, (operator.getitem,)) and set(item.users) <= {flat} for item in items):
            return None
        reads += [user, *items]
    return reads


def _fuse_score_topk(gm: fx.GraphModule, match: _ScoreTopKMatch, backend):
    conv = gm.get_submodule(match.conv.target)
    fused = ScoreTopK(conv.in_channels, conv.out_channels, match.k, backend=backend)
    fused.weight = conv.weight
    fused.train(conv.training)
    path = match.conv.target
    if _is_referenced(gm.graph, path, [match.conv]):
        path = _unused_path(gm, path + "_fused")
    _install(gm, path, fused)
    _replace_nodes(gm.graph, match.conv, match.nodes, match.values, path)


# ---------------------------------------------------------------------------------------------
# Graph and module-tree surgery
# ---------------------------------------------------------------------------------------------
def _replace_nodes(graph: fx.Graph, conv: fx.Node, pattern: list, outputs: list, target: str):
    """Calls module `target` on the conv's input in place of the pattern; its result replaces `outputs`."""
    with graph.inserting_before(conv):
        fused = graph.call_module(target, (conv.args[0],))
    for node in outputs:
        node.replace_all_uses_with(fused)
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(pattern, key=position.__getitem__, reverse=True):  # users before what they use
        graph.erase_node(node)


def _is_referenced(graph: fx.Graph, path: str, ignore: list) -> bool:
    """Whether a node not in `ignore` calls or reads the module at `path` or anything inside it."""
    return any(node.op in ("call_module", "get_attr") and node not in ignore
               and (node.target == path or node.target.startswith(path + "."))
               for node in graph.nodes)


def _unused_path(gm: fx.GraphModule, path: str) -> str:
    """`path`, or `path` with a number appended, whichever is first free in its parent module."""
    parent_path, _, name = path.rpartition(".")
    parent, candidate, n = gm.get_submodule(parent_path), name, 1
    while hasattr(parent, candidate):
        n += 1
        candidate = f"{name}{n}"
    return f"{parent_path}.{candidate}" if parent_path else candidate


def _install(gm: fx.GraphModule, path: str, module: nn.Module):
    parent_path, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent_path), name, module)


def _delete_unreferenced(gm: fx.GraphModule, paths: list):
    """Drops the modules at `paths` that no node uses any more (a shared max-pool stays until its last use)."""
    for path in dict.fromkeys(paths):
        if not _is_referenced(gm.graph, path, []):
            gm.delete_submodule(path)
