"""Selection primitives shared by the ops that pick k entries per row: topk_pool, random_k_pool,
score_topk and snet_head.

Selection is k rounds of "max, lowest position among ties, remove" on order-preserving int32 keys
of the float32 values (sortable_key), so ties and NaN are exact and no sort is needed (k is small;
the triton backend takes k <= MAX_KERNEL_K, so that merge tiles stay bounded). A row's positions
are split into chunks whose k best become candidates (write_candidates), merged per row.
Kernels:
  _topk_chunk_kernel   stage 1: per (row, chunk of positions) the chunk's k best as candidates
  _topk_reduce_kernel  between the stages while a row holds more candidates than one merge tile:
                       per (row, group of candidates) the group's k best, as fewer candidates
  _topk_merge_kernel   stage 2: per row the k best candidates in descending order (k rounds), rank dropout
  _topk_rank_merge_kernel  stage 2 when rows are too few to give every SM a program (batch 1): per
                       (row, block of candidates) each candidate's rank, counted against all the row's
                       candidates, and the ones ranked below k stored at their rank; same answers
  _scatter_rows_kernel backward of a row gather (lfm::scatter_rows): the gradient at the selected positions
Launchers give every SM a program where they can (configs.fill_target): fewer rows per program, then
shorter chunks, and the rank merge when rows are fewer than SMs.
Index math: int64 for each row's base (b * sb + c * sc, rows * M, rows * k: these pass 2^31 on large
batches or many candidates); int32 within a row, for positions, candidate slots and in-plane offsets
(select_chunks checks the plane's extent), with int32 division by W only for a position's row and column.
"""
import functools

import torch
import triton
import triton.language as tl

from .backend import call_op, on_input_device
from .checks import MAX_KERNEL_K
from .configs import cdiv, fill_target, halve_to_fill, launch, launch_config, policy_state
from .randomness import dropout_scale, rank_drop_probs

EMPTY_KEY = tl.constexpr(-2147483648)  # below the key of every float, NaN included
NAN_KEY = tl.constexpr(2147483647)  # the key of NaN: above every number
NO_POSITION = tl.constexpr(2147483647)  # position of an empty candidate slot: after every real one


@triton.jit
def sortable_key(v):
    """float32 -> int32, one-to-one on non-NaN values (so key_to_value gives the value back, the sign of
    a zero included) and ordered as the values, with -0.0 (key -1) just below +0.0 (key 0) and NaN
    above +inf. Selection compares rank_key(key), in which -0.0 and +0.0 are equal, as torch.topk's."""
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where(v != v, NAN_KEY, key)


@triton.jit
def rank_key(key):
    """The key selection ranks by: the two zeros tie (their keys are -1 and 0, adjacent)."""
    return tl.where(key == -1, 0, key)


@triton.jit
def key_to_value(key):
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pop_max(keys, pos):
    """One selection round on a [R, N] tile: per row the largest key (lowest position among keys
    of equal rank_key), which is then removed. Returns (its exact key [R], position [R], keys, pos)."""
    ranked = rank_key(keys)
    best = tl.max(ranked, axis=1)
    where = tl.min(tl.where(ranked == best[:, None], pos, NO_POSITION), axis=1)
    hit = pos == where[:, None]
    key = tl.max(tl.where(hit, keys, EMPTY_KEY), axis=1)  # -0.0 or +0.0 where best is a zero
    return key, where, tl.where(hit, EMPTY_KEY, keys), tl.where(hit, NO_POSITION, pos)


@triton.jit
def philox_uint(seed_ptr, b, c, n):
    """Philox keyed on (seed, offset) from torch's generator and the logical index (b, c, n):
    independent of block sizes and grid shape."""
    seed = tl.load(seed_ptr)
    offset = tl.load(seed_ptr + 1).to(tl.uint32)
    zero = tl.zeros(n.shape, dtype=tl.uint32)
    r, _, _, _ = tl.philox(seed, n.to(tl.uint32) + zero, c.to(tl.uint32) + zero,
                           b.to(tl.uint32) + zero, offset + zero)
    return r


@triton.jit
def load_candidates(cand_key_ptr, cand_pos_ptr, rows, row_live, slot0, M, BLOCK_M: tl.constexpr):
    """[rows, BLOCK_M] candidate keys and positions from slots [slot0, slot0 + BLOCK_M) of the (rows, M)
    buffers; slots past M are empty."""
    slots = slot0 + tl.arange(0, BLOCK_M)
    live = row_live[:, None] & (slots < M)[None, :]
    at = rows.to(tl.int64)[:, None] * M + slots[None, :]
    return (tl.load(cand_key_ptr + at, mask=live, other=EMPTY_KEY),
            tl.load(cand_pos_ptr + at, mask=live, other=NO_POSITION))


@triton.jit
def write_candidates(keys, pos, cand_key_ptr, cand_pos_ptr, rows, row_live, slot0, M, k):
    """k selection rounds on a [R, N] tile; round r goes to candidate slot slot0 + r of each row (int64
    offsets: rows * M can pass 2^31 where a row has many chunks)."""
    at = rows.to(tl.int64) * M + slot0
    for r in range(0, k):
        best, where, keys, pos = pop_max(keys, pos)
        tl.store(cand_key_ptr + at + r, best, mask=row_live)
        tl.store(cand_pos_ptr + at + r, where, mask=row_live)


@triton.jit
def _topk_chunk_kernel(
    x_ptr, cand_key_ptr, cand_pos_ptr, seed_ptr,
    n_rows, C, N, W, n_terms, st, sb, sc, sh, sw, k, M,
    RANDOM_KEYS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Stage 1. Grid: (cdiv(B*C, BLOCK_R), cdiv(N, BLOCK_N)).

    Reads a [BLOCK_R rows, BLOCK_N positions] tile of x through its strides (any layout), the float32
    sum of n_terms such maps st elements apart (in order; snet_head's split scores) when n_terms > 1,
    and writes each row's k best (key, position) to candidate slots [chunk*k, chunk*k + k) of the
    int32 (B*C, M) buffers. With RANDOM_KEYS the keys are Philox integers of (b, c, position)
    instead of x, so the k best are k distinct uniform random positions (random_k_pool).
    Offsets: int64 per row; int32 within a plane (the launcher checks the plane's extent).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_live = rows < n_rows
    live = row_live[:, None] & (cols < N)[None, :]
    b = rows // C
    c = rows % C
    if RANDOM_KEYS:
        rnd = philox_uint(seed_ptr, b[:, None], c[:, None], cols[None, :])
        keys = (rnd >> 1).to(tl.int32)
    else:
        addr = (b.to(tl.int64) * sb + c.to(tl.int64) * sc)[:, None] + ((cols // W) * sh + (cols % W) * sw)[None, :]
        v = tl.load(x_ptr + addr, mask=live, other=0.0).to(tl.float32)
        for t in range(1, n_terms):
            v += tl.load(x_ptr + t * st + addr, mask=live, other=0.0)
        keys = sortable_key(v)
    keys = tl.where(live, keys, EMPTY_KEY)
    pos = tl.where(live, cols[None, :], NO_POSITION)
    write_candidates(keys, pos, cand_key_ptr, cand_pos_ptr, rows, row_live, chunk * k, M, k)


@triton.jit
def _topk_reduce_kernel(
    cand_key_ptr, cand_pos_ptr, next_key_ptr, next_pos_ptr, n_rows, M, M_next, k,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Candidate reduction. Grid: (cdiv(B*C, BLOCK_R), cdiv(M, BLOCK_M)).

    Reads candidate slots [g*BLOCK_M, (g+1)*BLOCK_M) of each row of the (B*C, M) buffers and writes
    their k best to slots [g*k, g*k + k) of the (B*C, M_next) buffers (BLOCK_M >= 2k, so each pass
    at least halves the candidates and tiles stay bounded for any supported k).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    row_live = rows < n_rows
    keys, pos = load_candidates(cand_key_ptr, cand_pos_ptr, rows, row_live, group * BLOCK_M, M, BLOCK_M)
    write_candidates(keys, pos, next_key_ptr, next_pos_ptr, rows.to(tl.int64), row_live, group * k, M_next, k)


@triton.jit
def _store_ranked(out_ptr, idx_ptr, keep_ptr, probs_ptr, seed_ptr, rows, C, rank, key, pos, live, k, scale,
                  APPLY_DROP: tl.constexpr):
    """Stores candidates (key, pos) at their rank (< k where live) of their rows of the (B*C, k) outputs:
    the value (out's dtype), the int64 position and a uint8 keep flag. With APPLY_DROP, rank r is dropped
    when a Philox uniform of (b, c, r) falls below probs[r]; survivors are multiplied by `scale`."""
    value = key_to_value(key)
    keep = rank >= 0
    if APPLY_DROP:
        u = tl.random.uint_to_uniform_float(philox_uint(seed_ptr, rows // C, rows % C, rank))
        keep = u >= tl.load(probs_ptr + rank, mask=live, other=0.0)
        value = value * keep.to(tl.float32) * scale
    at = rows.to(tl.int64) * k + rank
    tl.store(out_ptr + at, value.to(out_ptr.dtype.element_ty), mask=live)
    tl.store(idx_ptr + at, pos.to(tl.int64), mask=live)
    tl.store(keep_ptr + at, keep.to(tl.uint8), mask=live)


@triton.jit
def _topk_merge_kernel(
    cand_key_ptr, cand_pos_ptr, out_ptr, idx_ptr, keep_ptr, probs_ptr, seed_ptr,
    n_rows, C, M, k, scale,
    APPLY_DROP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Stage 2. Grid: (cdiv(B*C, BLOCK_R),).

    Reads each row's M candidates and selects the k best in descending order, one per round, each
    stored at its rank by _store_ranked (values, positions and keep flags, all (B*C, k)).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_live = rows < n_rows
    keys, pos = load_candidates(cand_key_ptr, cand_pos_ptr, rows, row_live, 0, M, BLOCK_M)
    for r in range(0, k):
        best, where, keys, pos = pop_max(keys, pos)
        _store_ranked(out_ptr, idx_ptr, keep_ptr, probs_ptr, seed_ptr, rows, C, rows * 0 + r, best, where, row_live,
                      k, scale, APPLY_DROP)


@triton.jit
def _topk_rank_merge_kernel(
    cand_key_ptr, cand_pos_ptr, out_ptr, idx_ptr, keep_ptr, probs_ptr, seed_ptr,
    C, M, k, scale,
    APPLY_DROP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Stage 2 for few rows (too few for a program per SM). Grid: (B*C, cdiv(M, BLOCK_I)).

    The rank of each of BLOCK_I candidates of a row is the number of the row's M candidates ahead of
    it in selection order (a larger rank_key, or an equal one at a lower position), counted in blocks of
    BLOCK_J. Real candidates have distinct positions and every one is ahead of an empty slot, so the
    ranks below k are those _topk_merge_kernel's rounds give; those candidates are stored at their rank.
    """
    row = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_live = i < M
    at = row.to(tl.int64) * M
    key = tl.load(cand_key_ptr + at + i, mask=i_live, other=EMPTY_KEY)
    pos = tl.load(cand_pos_ptr + at + i, mask=i_live, other=NO_POSITION)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, M, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        other_key = tl.load(cand_key_ptr + at + j, mask=j < M, other=EMPTY_KEY)[None, :]
        other_pos = tl.load(cand_pos_ptr + at + j, mask=j < M, other=NO_POSITION)[None, :]
        other_key, mine = rank_key(other_key), rank_key(key)[:, None]
        ahead = (other_key > mine) | ((other_key == mine) & (other_pos < pos[:, None]))
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    _store_ranked(out_ptr, idx_ptr, keep_ptr, probs_ptr, seed_ptr, row, C, rank, key, pos, i_live & (rank < k), k,
                  scale, APPLY_DROP)


@triton.jit
def _scatter_rows_kernel(
    grad_ptr, idx_ptr, keep_ptr, dx_ptr, n_rows, N, k, scale,
    HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of a row gather. Grid: (cdiv(rows, BLOCK_R),).

    dx[row, idx[row, r]] = grad[row, r] * keep[row, r] * scale into a zero-filled (rows, N)
    buffer. Positions within a row are distinct, so plain stores suffice (no atomics).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ranks = tl.arange(0, BLOCK_K)
    live = (rows < n_rows)[:, None] & (ranks < k)[None, :]
    at = rows[:, None].to(tl.int64) * k + ranks[None, :]
    g = tl.load(grad_ptr + at, mask=live, other=0.0).to(tl.float32)
    if HAS_KEEP:
        g = tl.where(tl.load(keep_ptr + at, mask=live, other=0) != 0, g * scale, 0.0)
    pos = tl.load(idx_ptr + at, mask=live, other=0)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * N + pos, g.to(dx_ptr.dtype.element_ty), mask=live)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _selection_config() -> dict:
    return launch_config("topk", torch.device("cpu"))  # the same on every GPU family


def launch_options() -> dict:
    """The table's num_warps and num_stages for the selection kernels."""
    config = _selection_config()
    return dict(num_warps=config["num_warps"], num_stages=config["num_stages"])


def tile_elements() -> int:
    """Elements per [rows, positions] tile (configs.py; 16x under the interpreter's tiles). Results never
    depend on tiling (Philox keys on logical indices)."""
    return _selection_config()["TILE_ELEMENTS"]


def merge_slots() -> int:
    """Most candidates one merge program holds per row: 2 * MAX_KERNEL_K, so a reduction pass always
    halves them; with one row per program this stays in registers."""
    return max(2 * MAX_KERNEL_K, tile_elements())


def rows_per_program(width: int) -> int:
    """Rows per program so that a tile holds about tile_elements() elements."""
    tile = tile_elements()
    return max(1, min(tile // 64, tile // width))


def reduce_candidates(cand_key, cand_pos, k):
    """Reduction passes until each row's candidates fit one merge tile; returns the (B*C, M') buffers."""
    n_rows, M = cand_key.shape
    group, block_r, options = _reduce_plan(policy_state(cand_key.device))
    while M > group:
        groups = cdiv(M, group)
        next_key = torch.empty((n_rows, groups * k), dtype=torch.int32, device=cand_key.device)
        next_pos = torch.empty_like(next_key)
        if n_rows:
            launch(_topk_reduce_kernel, (cdiv(n_rows, block_r), groups),
                   cand_key, cand_pos, next_key, next_pos, n_rows, M, groups * k, k, BLOCK_R=block_r, BLOCK_M=group,
                   **options)
        cand_key, cand_pos, M = next_key, next_pos, groups * k
    return cand_key, cand_pos


# Launch plans, memoized per call signature and configs.policy_state (launchers run on every forward: their
# host time bounds batch-1 latency). They depend on shapes and the launch policy only, never on values.
@functools.lru_cache(maxsize=64)
def _reduce_plan(state: tuple) -> tuple:
    group = merge_slots()
    return group, rows_per_program(group), launch_options()


@functools.lru_cache(maxsize=1024)
def _chunk_plan(B: int, C: int, N: int, k: int, device: torch.device, state: tuple) -> tuple:
    """(constexprs, chunks per row) of select_chunks: fewer rows per program, then shorter chunks, until
    every SM has a program."""
    tiles = {"BLOCK_N": chunk_size(N)}
    tiles["BLOCK_R"] = rows_per_program(tiles["BLOCK_N"])
    target = fill_target(device)

    def programs(t):
        return cdiv(B * C, t["BLOCK_R"]) * cdiv(N, t["BLOCK_N"])

    halve_to_fill(tiles, "BLOCK_R", programs, target, smallest=1)
    halve_to_fill(tiles, "BLOCK_N", programs, target, smallest=max(64, triton.next_power_of_2(2 * k)))
    return {**tiles, **launch_options()}, cdiv(N, tiles["BLOCK_N"])


@functools.lru_cache(maxsize=1024)
def _merge_plan(n_rows: int, M: int, device: torch.device, state: tuple) -> tuple:
    """(row merge?, grid, constexprs) of merge_candidates: fewer rows per program until every SM has one;
    with fewer rows than that, the rank merge (one program per block of a row's candidates)."""
    block_m, target = triton.next_power_of_2(M), fill_target(device)
    if n_rows >= target:
        tiles = halve_to_fill({"BLOCK_R": rows_per_program(block_m)}, "BLOCK_R",
                              lambda t: cdiv(n_rows, t["BLOCK_R"]), target, smallest=1)
        return True, (cdiv(n_rows, tiles["BLOCK_R"]),), dict(BLOCK_M=block_m, **tiles, **launch_options())
    tiles = halve_to_fill({"BLOCK_I": block_m}, "BLOCK_I", lambda t: n_rows * cdiv(M, t["BLOCK_I"]),
                          target, smallest=4)
    tiles["BLOCK_J"] = max(16, min(block_m, tile_elements() // tiles["BLOCK_I"]))
    return False, (n_rows, cdiv(M, tiles["BLOCK_I"])), dict(**tiles, **launch_options())


def chunk_size(n: int) -> int:
    """Positions per stage-1 program: the whole row up to WHOLE_ROW, else chunks of CHUNK (configs.py)."""
    config = _selection_config()
    return triton.next_power_of_2(n) if n <= config["WHOLE_ROW"] else config["CHUNK"]


def merge_candidates(cand_key, cand_pos, out, k, *, seed=None, drop=None):
    """Stage 2 over (B*C, M) candidates into out (B, C, k); returns idx and keep, (B*C, k) (_merge_plan)."""
    cand_key, cand_pos = reduce_candidates(cand_key, cand_pos, k)
    n_rows, M = cand_key.shape
    idx = torch.empty((n_rows, k), dtype=torch.int64, device=out.device)
    keep = torch.empty((n_rows, k), dtype=torch.uint8, device=out.device)
    if not n_rows:
        return idx, keep
    apply_drop = drop is not None
    probs = rank_drop_probs(k, *drop, device=out.device) if apply_drop else idx
    args = (cand_key, cand_pos, out, idx, keep, probs, seed if apply_drop else idx)
    scale = dropout_scale(*drop) if apply_drop else 1.0
    row_merge, grid, meta = _merge_plan(n_rows, M, out.device, policy_state(out.device))
    if row_merge:
        launch(_topk_merge_kernel, grid, *args, n_rows, out.shape[1], M, k, scale, APPLY_DROP=apply_drop, **meta)
    else:
        launch(_topk_rank_merge_kernel, grid, *args, out.shape[1], M, k, scale, APPLY_DROP=apply_drop, **meta)
    return idx, keep


def select_chunks(x, k, *, seed=None):
    """Stage 1 over a (B, C, H, W) tensor, or over the float32 sum of the S maps of an (S, B, C, H, W) one
    (snet_head's split scores); returns the int32 candidate buffers (B*C, M) (_chunk_plan)."""
    terms = x if x.dim() == 5 else x.unsqueeze(0)
    S, B, C, H, W = terms.shape
    N = H * W
    if N and (H - 1) * terms.stride(3) + (W - 1) * terms.stride(4) >= 2**31:
        raise ValueError(f"topk: an (H, W) = ({H}, {W}) plane with strides {terms.stride()[3:]} spans 2^31 "
                         "elements or more; its offsets are int32")
    meta, n_chunks = _chunk_plan(B, C, N, k, x.device, policy_state(x.device))
    M = n_chunks * k
    cand_key = torch.empty((B * C, M), dtype=torch.int32, device=x.device)
    cand_pos = torch.empty((B * C, M), dtype=torch.int32, device=x.device)
    if not B * C:
        return cand_key, cand_pos
    launch(
        _topk_chunk_kernel, (cdiv(B * C, meta["BLOCK_R"]), n_chunks),
        terms, cand_key, cand_pos, seed if seed is not None else cand_key,
        B * C, C, N, W, S, *terms.stride(), k, M,
        RANDOM_KEYS=seed is not None, **meta,
    )
    return cand_key, cand_pos


@on_input_device
def _scatter_rows(grad: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None, scale: float,
                  shape: list[int]) -> torch.Tensor:
    """Gradient of a per-row gather: grad (B, C, k) placed at idx in a zero (B, C, *rest) tensor."""
    dx = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    n_rows, k = shape[0] * shape[1], idx.shape[-1]
    N = dx.numel() // max(n_rows, 1)
    block_k = triton.next_power_of_2(k)
    block_r = rows_per_program(block_k)
    if n_rows:
        keep = keep.contiguous() if keep is not None else None
        launch(_scatter_rows_kernel, (cdiv(n_rows, block_r),),
               grad.contiguous(), idx.contiguous(), keep if keep is not None else idx, dx, n_rows, N, k, scale,
               HAS_KEEP=keep is not None, BLOCK_R=block_r, BLOCK_K=block_k, **launch_options())
    return dx


_scatter_rows_op = torch.library.custom_op("lfm::scatter_rows", _scatter_rows, mutates_args=())


@_scatter_rows_op.register_fake
def _(grad, idx, keep, scale, shape):
    return grad.new_empty(shape)


def scatter_rows(grad, idx, keep, scale, shape):
    """lfm::scatter_rows, called directly in plain eager code (backend.call_op): the row gathers' backward."""
    return call_op(torch.ops.lfm.scatter_rows, _scatter_rows, grad, idx, keep, scale, shape)
