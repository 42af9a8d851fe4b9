"""Launch plans of the decode GEMMs and of paged decode attention: tiles, split, programs.

GEMM (fused_linear's ln_linear on fp16/bf16/fp32 weights, int8_linear's int8_ln_linear on int8
weight codes: one planner, `int8=True` selects the int8 kind). Decode and small-batch launches
(M <= 256) are bandwidth bound: the weights are all of the traffic, so the launch must put
>= 2 x SM-count programs in flight for every M, M = 1 included. The K dimension is cut into
`split` ranges of k_per_split (a multiple of BLOCK_K); every (row tile, column tile, K range) is
one program, and the last range of a tile to finish reduces the fp32 partials in the fixed order
0..split-1.

    reduction (BLOCK_N, BLOCK_K, k_per_split, split) = f(K, N, dtype, weight kind, SM count)  -- never M

So a row's sum is cut and ordered the same way whatever else is batched with it (the engine's
batch invariance relies on that); M only changes the number of row tiles. Rows tiles are 16 rows
(mma.sync m16) up to M = 64 and 64 rows up to M = 256, with the same BLOCK_N / BLOCK_K, so the
program count grows with M and M = 1 is the binding case: cdiv(N, BLOCK_N) * split >= 2 * SMs.
Among the (BLOCK_N, BLOCK_K, k_per_split) choices that meet it, the plan takes the one with the
least extra traffic per row on top of the weights: the fp32 partials (split * N * 4 bytes written
and read back) and the activation row re-read by every column tile (cdiv(N, BLOCK_N) * K * 2
bytes), wider BLOCK_N, then longer BLOCK_K, first on ties (fewer, longer coalesced rows). Where no
choice reaches 2 x SMs (K too short to cut), the most programs wins. BLOCK_K is 64 for fp16/bf16
weights and 32 for fp32; int8 codes may also take 128 (a 128-byte row segment of q per output
channel, the same bytes per K tile as fp16 at 64), and fall back to 64 where 128 cannot fill the
GPU (K = 768: 6 blocks of 128). Above M = 256 (prefill chunks) the launcher uses unsplit
64 x 128 and 128 x 128 tiles (compute bound): those rows are reduced in one K loop.

Paged decode attention. The context of every sequence is cut into fixed KV chunks of KV_CHUNK
tokens, one program per (sequence, head, chunk): the split of a sequence's softmax depends only on
its own length, never on the batch or head count. The grid's chunk axis is sized by the block
table's width (max context of the step, no host sync); chunks past a sequence's end are empty
and exit after writing a neutral partial.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# ---- GEMM ---------------------------------------------------------------------------------------

SPLIT_MAX_M = 256          # decode / small-batch launches: planned split-K
DECODE_MAX_M = 64          # 16-row tiles up to here, 64-row tiles up to SPLIT_MAX_M
SMALL_MAX_M = 512          # unsplit 64 x 128 tiles up to here, 128 x 128 beyond
PROGRAMS_PER_SM = 2
_BLOCK_NS = (128, 64, 32)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Reduction:
    """How a row's K sum is cut: M-independent."""
    block_n: int
    block_k: int
    k_per_split: int
    split: int


@dataclass(frozen=True)
class GemmPlan:
    tile_name: str
    tile: TileConfig
    split: int
    k_per_split: int
    programs: int


# Unsplit tiles (M > SPLIT_MAX_M, and every fp32 launch above it): see fused_linear's docstring.
UNSPLIT_TILES = {
    "small": TileConfig(64, 128, 64, 8, 8, 4),
    "prefill": TileConfig(128, 128, 64, 8, 8, 3),        # sm_80: 82 KB smem, mma.sync
    "prefill_sm90": TileConfig(128, 128, 64, 8, 8, 4),   # sm_90: two wgmma warpgroups
    "fp32": TileConfig(64, 64, 32, 8, 8, 2),
}
# int8 codes above SPLIT_MAX_M: one 64 x 128 tile (see int8_linear's docstring), fp32 as above.
UNSPLIT_INT8_TILES = {
    "int8_prefill": TileConfig(64, 128, 64, 8, 8, 3),    # 4 warps spill on sm_80 with the GELU epilogue
    "fp32": UNSPLIT_TILES["fp32"],
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


_REDUCTIONS: dict[tuple, Reduction] = {}


def _block_ks(dtype: torch.dtype, int8: bool) -> tuple[int, ...]:
    if _is_fp32(dtype):
        return (32,)
    return (128, 64) if int8 else (64,)


def reduction(K: int, N: int, dtype: torch.dtype, num_sms: int, *, int8: bool = False) -> Reduction:
    """The M-independent K split of a decode GEMM with activations of `dtype` and weights of that
    dtype (int8=False) or int8 codes (see the module docstring)."""
    key = (K, N, dtype, num_sms, int8)
    found = _REDUCTIONS.get(key)
    if found is not None:
        return found
    target = PROGRAMS_PER_SM * num_sms
    best, best_rank = None, None
    for block_n in _BLOCK_NS:
        for block_k in _block_ks(dtype, int8):
            k_blocks = _cdiv(K, block_k)
            tiles_n = _cdiv(N, block_n)
            want = min(_cdiv(target, tiles_n), k_blocks)
            k_per_split = (k_blocks // want) * block_k       # floor: cdiv(K, k_per_split) >= want
            split = _cdiv(K, k_per_split)
            programs = tiles_n * split
            extra = (split * N * 8 if split > 1 else 0) + tiles_n * K * 2
            rank = (programs < target, -programs if programs < target else extra, -block_n, -block_k)
            if best_rank is None or rank < best_rank:
                best, best_rank = Reduction(block_n, block_k, k_per_split, split), rank
    _REDUCTIONS[key] = best
    return best


def split_tile(M: int, red: Reduction, dtype: torch.dtype) -> tuple[str, TileConfig]:
    """The row tile of a planned (M <= SPLIT_MAX_M) launch."""
    if M <= DECODE_MAX_M:
        return "decode", TileConfig(16, red.block_n, red.block_k, 8, 4, 2 if _is_fp32(dtype) else 4)
    return "batch", TileConfig(64, red.block_n, red.block_k, 8, 4 if red.block_n <= 64 else 8, 2 if _is_fp32(dtype) else 3)


def gemm_plan(M: int, N: int, K: int, dtype: torch.dtype, capability: int, num_sms: int, *,
              int8: bool = False) -> GemmPlan:
    """Tiles, split and program count of one GEMM launch (int8: on int8 weight codes)."""
    if M <= SPLIT_MAX_M:
        red = reduction(K, N, dtype, num_sms, int8=int8)
        name, tile = split_tile(M, red, dtype)
        return GemmPlan(name, tile, red.split, red.k_per_split, _cdiv(M, tile.block_m) * _cdiv(N, tile.block_n) * red.split)
    if _is_fp32(dtype):
        name = "fp32"
    elif int8:
        name = "int8_prefill"
    elif M <= SMALL_MAX_M:
        name = "small"
    else:
        name = "prefill_sm90" if capability >= 90 else "prefill"
    tile = (UNSPLIT_INT8_TILES if int8 else UNSPLIT_TILES)[name]
    return GemmPlan(name, tile, 1, _cdiv(K, tile.block_k) * tile.block_k,
                    _cdiv(M, tile.block_m) * _cdiv(N, tile.block_n))


# ---- paged attention ------------------------------------------------------------------------------

KV_TILE = 64               # tokens per K/V tile of the paged kernel's loop
KV_CHUNK = 128             # tokens per split: two tiles, the second prefetched while the first is used
MAX_SPLITS = 64            # the merge's fixed capacity: contexts up to MAX_SPLITS * KV_CHUNK = 8192


def kv_tile(block_size: int) -> int:
    """Tokens per K/V tile of the loop: whole cache blocks."""
    return max(KV_TILE, block_size)


def kv_chunk(block_size: int) -> int:
    """Tokens per split (a whole number of tiles)."""
    return max(KV_CHUNK, kv_tile(block_size))


def attention_plan(max_context: int, block_size: int, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, tiles per split) for block tables holding max_context tokens: fixed KV chunks by
    default (longer ones past MAX_SPLITS chunks), or the context cut into num_splits equal runs."""
    tiles = _cdiv(max_context, kv_tile(block_size))
    if num_splits is None:
        per_split = max(kv_chunk(block_size) // kv_tile(block_size), _cdiv(tiles, MAX_SPLITS))
    else:
        per_split = _cdiv(tiles, num_splits)
    return _cdiv(tiles, per_split), per_split


def attention_splits(max_context: int, block_size: int) -> int:
    """The grid's split axis of a step whose block tables hold max_context tokens."""
    return attention_plan(max_context, block_size)[0]


# ---- the decode plan table (`gpt2-engine kernels --plan`) -------------------------------------------

PLAN_MS = (1, 8, 16, 32, 64, 128, 256)


def _decode_launches(cfg):
    C = cfg.n_embd
    return [("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, 4 * C), ("mlp.c_proj", 4 * C, C),
            ("lm_head", C, cfg.vocab_size)]


def plan_table(models: dict, num_sms: int, dtype: torch.dtype = torch.float16, block_size: int = 16) -> list[dict]:
    """One row per decode launch of each model at each M of PLAN_MS: the GEMMs on `dtype` weights,
    the same GEMMs on int8 codes (launch names suffixed " int8", `weights` "int8"), then paged
    attention at a full context."""
    rows = []
    elt = torch.finfo(dtype).bits // 8
    for model, cfg in models.items():
        for M in PLAN_MS:
            for int8, weights, suffix in ((False, str(dtype).removeprefix("torch."), ""), (True, "int8", " int8")):
                for launch, K, N in _decode_launches(cfg):
                    plan = gemm_plan(M, N, K, dtype, 90, num_sms, int8=int8)
                    t = plan.tile
                    rows.append(dict(model=model, launch=launch + suffix, kind="gemm", weights=weights, M=M, K=K, N=N,
                                     split=plan.split, programs=plan.programs, tile=f"{t.block_m}x{t.block_n}x{t.block_k}",
                                     k_per_split=plan.k_per_split,
                                     bytes_per_program=min(plan.k_per_split, K) * t.block_n * (1 if int8 else elt)))
            splits = attention_splits(cfg.n_positions, block_size)
            head_dim = cfg.n_embd // cfg.n_head
            rows.append(dict(model=model, launch="attn.paged_decode", kind="attention", M=M, K=cfg.n_positions,
                             N=head_dim, split=splits, programs=M * cfg.n_head * splits,
                             tile=f"{KV_TILE}x{head_dim}", k_per_split=kv_chunk(block_size),
                             bytes_per_program=2 * kv_chunk(block_size) * head_dim * elt))
    return rows
