"""GPT-2's decode step as one persistent launch (gpt2_engine.kernels.persistent_decode): the arenas
and the schedule of tile instructions, built once per (model, batch bucket), and the time model.

Opt-in (`decode_kernel="persistent"` on the constructors, `--decode-kernel persistent` on the
CLI): decode-only steps of up to MAX_ROWS rows whose every row samples run here; other steps take
the multi-launch path (the engine logs that once).

Arenas (built once per model; every part starts at a multiple of 16 elements)
    weights  one tensor in the model's dtype: the stacked embedding [V + P, C16] (rows padded to 16
             elements), then each linear tile-major: the LN-folded c_attn W' [C, 3C], c_proj W
             [C, C], LN-folded c_fc W' [C, 4C], mlp c_proj W [4C, C] of every layer and the
             LN-folded LM head W' [C, V] cut into [BLOCK_K, BLOCK_N] tiles, each stored as one
             contiguous row-major run (zero-padded past K and N), in the order (column tile, K split)
             the schedule reads them. A copy: the opt-in path holds the weights twice (the
             multi-launch path keeps its own).
    params   fp32: every folded bias b', colsum 1^T W' and plain bias.
    act      MAX_ROWS rows of each of x [C] | qkv [3C] | attn [C] | h [4C] | logits [V], widths padded
             to BLOCK_N, the model's dtype; x is the residual stream, updated in place by the two
             residual GEMVs (each tile reads and writes only its own columns, after every reader of
             the old x has published).

Schedule of a bucket of R rows (stages in order; each waits for the whole previous stage):
    embed (C / BLOCK_N tiles) -> per layer [QKV GEMV + KV write -> attention chunks of (row, head)
    -> c_proj + residual -> c_fc + GELU -> mlp c_proj + residual] -> LM head (ln_f folded). GEMVs
    are [BLOCK_K x BLOCK_N] tiles (128 x 64: 16 KB of fp16 weights), K cut into cdiv(K, BLOCK_K) splits.
    Attention cuts each context into chunks sized so that R x H x chunks is about 2 x SMs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2_engine.kernels import fused_linear
from gpt2_engine.kernels import persistent_decode as pk
from gpt2_engine.kernels.launch_plan import kv_tile
from gpt2_engine.model import PagedGPT2, StepInputs

MAX_ROWS = pk.BLOCK_M
BUCKETS = (1, 2, 4, 8, 16)
DECODE_KERNELS = ("graphs", "persistent")
log = logging.getLogger(__name__)


def check_decode_kernel(decode_kernel: str) -> str:
    if decode_kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {decode_kernel!r}")
    return decode_kernel


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Arena:
    """Tensors appended to one flat buffer, each at a multiple of 16 elements; `add` returns its offset."""

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, t: torch.Tensor) -> int:
        off = self.size
        flat = t.reshape(-1)
        self.parts.append(torch.cat([flat, flat.new_zeros(_round_up(flat.numel(), 16) - flat.numel())]))
        self.size += self.parts[-1].numel()
        return off

    def build(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([p.to(dtype) for p in self.parts])


@dataclass(frozen=True)
class _Linear:
    w_off: int          # tile (t, s) at w_off + (t * splits + s) * BLOCK_K * BLOCK_N
    K: int
    N: int
    bias_off: int
    colsum_off: int     # -1: no LayerNorm folded in


class _Builder:
    """Appends instructions (dicts of fields) and allocates counters; a stage is a done counter."""

    def __init__(self):
        self.rows: list[list[int]] = []
        self.num_counters = pk.FIRST_FREE_COUNTER
        self.workspace = 0

    def counter(self) -> int:
        self.num_counters += 1
        return self.num_counters - 1

    def add(self, **fields) -> None:
        row = dict.fromkeys(pk.FIELDS, 0) | dict(bias_off=-1, colsum_off=-1, res_off=-1, kv_off=-1, n_split=1) | fields
        self.rows.append([row[name] for name in pk.FIELDS])


class PersistentDecode:
    """The persistent step of one PagedGPT2 (triton backend, unquantized) over its KV cache."""

    def __init__(self, model: PagedGPT2, kv_cache: torch.Tensor, block_size: int):
        if model.backend != "triton" or model.quantization:
            raise ValueError("decode_kernel='persistent' needs backend='triton' without quantization")
        cfg, self.model, self.kv_cache = model.config, model, kv_cache
        if cfg.n_embd % 16 or not kv_cache.is_contiguous():
            raise ValueError(f"decode_kernel='persistent' needs n_embd % 16 == 0 (got {cfg.n_embd}) and a contiguous KV cache")
        self.dtype, device = model.dtype, model.device
        self.block_n = 64
        self.block_k = 64 if self.dtype == torch.float32 else 128       # 16 KB weight tiles (compile report: 2 programs per SM)
        self.cache_block = block_size
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        weights, params = _Arena(), _Arena()

        def linear(w: torch.Tensor, bias: torch.Tensor | None, colsum: torch.Tensor | None = None) -> _Linear:
            K, N = w.shape
            bk, bn = self.block_k, self.block_n
            padded = w.new_zeros(_round_up(K, bk), _round_up(N, bn))
            padded[:K, :N] = w
            # [splits * BK, tiles * BN] -> [tiles, splits, BK, BN]: tile (t, s) one contiguous run
            tiles = padded.view(-1, bk, padded.shape[1] // bn, bn).permute(2, 0, 1, 3)
            return _Linear(weights.add(tiles), K, N, params.add(bias.float()) if bias is not None else -1,
                           params.add(colsum.float()) if colsum is not None else -1)

        def folded(f: fused_linear.FoldedLinear) -> _Linear:
            return linear(f.weight, f.bias, f.colsum)

        self.embed_stride = _round_up(cfg.n_embd, 16)
        self.embedding = weights.add(F.pad(model.embedding, (0, self.embed_stride - cfg.n_embd)))
        # the model's Linears on the triton backend (gpt2_engine.linear): LayerNorm-folded weights
        # (FoldedLinear) for qkv, fc and the LM head, [in, out] weights with their bias for the projections
        self.layers = [(folded(b.qkv.weight), linear(b.attn_proj.weight, b.attn_proj.bias),
                        folded(b.fc.weight), linear(b.mlp_proj.weight, b.mlp_proj.bias)) for b in model.h]
        self.lm_head = folded(model.lm_head.weight)
        self.weights, self.params = weights.build(self.dtype), params.build(torch.float32)
        C, V = cfg.n_embd, cfg.vocab_size
        self.widths = {name: _round_up(n, self.block_n) for name, n in dict(x=C, qkv=3 * C, attn=C, h=4 * C, logits=V).items()}
        self.act_off, off = {}, 0
        for name, width in self.widths.items():
            self.act_off[name] = off
            off += MAX_ROWS * width
        self.act = torch.zeros(off, dtype=self.dtype, device=device)
        self.schedules: dict[int, pk.Schedule] = {}      # built on a bucket's first step
        self.counters = torch.zeros(0, dtype=torch.int32, device=device)
        self.workspace = torch.zeros(0, dtype=torch.float32, device=device)
        self.kv_v_offset = self._kv_offset(0, 1) - self._kv_offset(0, 0)
        self.sm_scale = 1.0 / math.sqrt(cfg.head_dim)
        self.max_rows = BUCKETS[-1]

    # ---- the schedule ----------------------------------------------------------------------------

    def schedule(self, rows: int) -> pk.Schedule:
        """The checked schedule of the smallest bucket >= rows (built and cached on first use), with
        counters and workspace grown to fit it."""
        bucket = next((b for b in BUCKETS if b >= rows), None)
        if bucket is None:
            raise ValueError(f"context_lens has {rows} rows; the persistent step covers 1..{self.max_rows}")
        if bucket not in self.schedules:
            built = self._schedule(bucket)
            pk.check_schedule(built.instructions, built.num_counters)
            if built.num_counters > self.counters.numel():
                self.counters = torch.zeros(built.num_counters, dtype=torch.int32, device=self.act.device)
            if built.workspace > self.workspace.numel():
                self.workspace = torch.zeros(built.workspace, dtype=torch.float32, device=self.act.device)
            self.schedules[bucket] = built
        return self.schedules[bucket]

    def _kv_offset(self, layer: int, k_or_v: int) -> int:
        """Element offset of a layer's K (0) or V (1) pool in the contiguous [L, 2, blocks, bs, H, D] cache."""
        return self.kv_cache[layer, k_or_v].storage_offset() - self.kv_cache.storage_offset()

    def _gemv(self, bld: _Builder, lin: _Linear, *, wait: tuple[int, int], x: str, out: str, residual: bool = False,
              gelu: bool = False, kv_layer: int | None = None) -> tuple[int, int]:
        """Instructions of one GEMV stage (every column tile x K split); returns its (done counter, units)."""
        done = bld.counter()
        tiles, splits = -(-lin.N // self.block_n), -(-lin.K // self.block_k)
        if splits > pk.MAX_SPLITS_K:
            raise ValueError(f"K = {lin.K} needs {splits} slices of {self.block_k}; the kernel merges at most {pk.MAX_SPLITS_K}")
        per_tile = _round_up(splits * pk.BLOCK_M * (self.block_n + 2), 16)   # partial tiles, then (mean, M2) per slice
        kv_off = self._kv_offset(kv_layer, 0) if kv_layer is not None else -1
        for t in range(tiles):
            split_ctr = bld.counter()
            for s in range(splits):
                bld.add(op=pk.GEMV, wait_ctr=wait[0], wait_count=wait[1], done_ctr=done, split_ctr=split_ctr,
                        n_split=splits, split=s, x_off=self.act_off[x], x_stride=self.widths[x], k=lin.K,
                        k0=s * self.block_k, w_off=lin.w_off + (t * splits + s) * self.block_k * self.block_n,
                        n0=t * self.block_n,
                        n=lin.N, bias_off=lin.bias_off, colsum_off=lin.colsum_off,
                        res_off=self.act_off[out] if residual else -1, out_off=self.act_off[out],
                        out_stride=self.widths[out], gelu=int(gelu), kv_off=kv_off,
                        ws_off=t * per_tile)
        bld.workspace = max(bld.workspace, tiles * per_tile)
        return done, tiles

    def _chunks(self, rows: int) -> tuple[int, int]:
        """(KV tiles per chunk, chunks) of a context of n_positions: rows x heads x chunks ~ 2 x SMs."""
        cfg = self.model.config
        tiles = -(-cfg.n_positions // kv_tile(self.cache_block))
        want = max(1, -(-2 * self.num_sms // (rows * cfg.n_head)))
        per_chunk = -(-tiles // want)
        return per_chunk, -(-tiles // per_chunk)

    def _schedule(self, rows: int) -> pk.Schedule:
        cfg, bld = self.model.config, _Builder()
        C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
        done = bld.counter()
        tiles = -(-C // self.block_n)
        for t in range(tiles):
            bld.add(op=pk.EMBED, wait_ctr=done, wait_count=0, done_ctr=done, split_ctr=done, w_off=self.embedding,
                    w_stride=self.embed_stride, n0=t * self.block_n, n=C, out_off=self.act_off["x"],
                    out_stride=self.widths["x"])
        stage = (done, tiles)
        per_chunk, chunks = self._chunks(rows)
        for layer, (c_attn, c_proj, c_fc, proj) in enumerate(self.layers):
            stage = self._gemv(bld, c_attn, wait=stage, x="x", out="qkv", kv_layer=layer)
            done = bld.counter()
            for r in range(rows):
                for h in range(H):
                    split_ctr = bld.counter()
                    for s in range(chunks):
                        bld.add(op=pk.ATTN, wait_ctr=stage[0], wait_count=stage[1], done_ctr=done,
                                split_ctr=split_ctr, n_split=chunks, split=s, x_off=self.act_off["qkv"],
                                x_stride=self.widths["qkv"], k=per_chunk, k0=r, n0=h, n=C,
                                kv_off=self._kv_offset(layer, 0), out_off=self.act_off["attn"],
                                out_stride=self.widths["attn"], ws_off=(r * H + h) * _round_up(chunks * (D + 2), 16))
            bld.workspace = max(bld.workspace, rows * H * _round_up(chunks * (D + 2), 16))
            stage = (done, rows * H)
            stage = self._gemv(bld, c_proj, wait=stage, x="attn", out="x", residual=True)
            stage = self._gemv(bld, c_fc, wait=stage, x="x", out="h", gelu=True)
            stage = self._gemv(bld, proj, wait=stage, x="h", out="x", residual=True)
        self._gemv(bld, self.lm_head, wait=stage, x="x", out="logits")
        table = torch.tensor(bld.rows, dtype=torch.int64, device=self.act.device)
        return pk.Schedule(table, bld.num_counters, bld.workspace, rows, self.block_n, self.block_k, D,
                           self.cache_block, kv_tile(self.cache_block), chunks)

    # ---- a step ------------------------------------------------------------------------------------

    def covers(self, step: StepInputs) -> bool:
        """A decode-only step of <= MAX_ROWS rows that needs every row's logits."""
        return (step.num_prefill_tokens == 0 and step.logits_indices is None and step.context_lens is not None
                and step.context_lens.shape[0] <= self.max_rows)

    def run(self, step: StepInputs, *, reference: bool = False) -> torch.Tensor:
        """fp32 logits [M, V] of a covered step (reference=True: the kernel's torch twin)."""
        M = step.context_lens.shape[0]
        schedule = self.schedule(M)
        fn = pk.run_schedule_ref if reference else pk.run_schedule
        fn(schedule, self.counters, self.weights, self.params, self.act, self.workspace, self.kv_cache,
           step.embed_indices, step.slot_mapping, step.block_tables, step.context_lens,
           kv_v_offset=self.kv_v_offset, eps=self.model.config.layer_norm_epsilon, sm_scale=self.sm_scale)
        width, off = self.widths["logits"], self.act_off["logits"]
        return self.act[off:off + M * width].view(M, width)[:, :self.model.config.vocab_size].float()


# ---- the per-step time model -----------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """An H200 as measured on a lent machine (bandwidth, SMs) and latencies from public Hopper
    microbenchmarks, loaded: the time model's assumptions, in microseconds."""
    bandwidth_gbps: float = 4300.0   # device copy, read + write
    num_sms: int = 132
    programs_per_sm: int = pk.PROGRAMS_PER_SM
    t_dram: float = 0.8              # first byte of a DRAM load under load
    t_l2: float = 0.3                # an L2 round trip (activations, partials, a poll that sees a publish)
    t_atomic: float = 0.5            # a gpu-scope atomic whose result the program waits for (split-K arrival)
    t_release: float = 0.3           # bar.sync + membar.gpu + the release increment of a publish
    t_launch: float = 4.0            # the one launch, the first instruction's fetch, the last program's exit


def time_model(schedule: pk.Schedule, *, context_len: int, elt_bytes: int = 2, hw: Hardware = Hardware()) -> dict:
    """Per-step time of `schedule` (all rows at context_len) from its instructions: bytes streamed,
    instructions per program, and the stage chain on the critical path.

    stream  every program keeps one weight tile in flight, requested before its wait; an
            instruction occupies its program for t_inst = instruction fields (t_dram: the table
            streams through L2 with the weights) + the tile's first byte (t_dram) + its transfer
            at the SM's bandwidth share + the split-K arrival (t_atomic). An SM streams at
            min(its share, programs_per_sm x tile / t_inst) (Little's law).
    chain   each stage waits for the whole previous one; after the last publish of stage s-1, its
            slowest instruction needs: the poll to see it (t_l2), x from L2 (t_l2), the arrival
            (t_atomic), the partials in ceil(S / SUM_SPLITS) L2 round trips, the residual (t_l2,
            residual GEMVs only) and its publish (t_release); attention: q, each KV tile it streams (t_dram), the
            arrival, the merge's loads and the publish. A stage with more instructions than
            programs adds a wave (t_inst) per extra round.
    step    max(stream, chain) + t_launch: weight loads run ahead of the chain, so the two overlap."""
    rows = schedule.instructions.tolist()
    tile = schedule.block_k * schedule.block_n * elt_bytes
    share = hw.bandwidth_gbps * 1e3 / hw.num_sms                                   # bytes per us per SM
    t_inst = 2 * hw.t_dram + tile / share + hw.t_atomic
    per_sm = min(share, hw.programs_per_sm * tile / t_inst)
    programs = hw.num_sms * hw.programs_per_sm
    kv_tiles = -(-context_len // schedule.kv_tile)
    stages: dict[int, list] = {}
    nbytes = 0
    for r in rows:
        f = dict(zip(pk.FIELDS, r))
        stages.setdefault(f["done_ctr"], []).append(f)
        if f["op"] == pk.GEMV:
            nbytes += tile
        elif f["op"] == pk.ATTN and f["k0"] < schedule.max_rows:
            mine = max(0, min(f["k"], kv_tiles - f["split"] * f["k"]))               # KV tiles of this chunk
            nbytes += 2 * mine * schedule.kv_tile * schedule.head_dim * elt_bytes
    chain = 0.0
    for group in stages.values():
        f = group[0]
        waves = -(-len(group) // programs) - 1
        if f["op"] == pk.GEMV:
            epilogue_loads = 1 if f["res_off"] >= 0 else 0       # the residual (bias and colsum come before the wait)
            t = (2 + epilogue_loads) * hw.t_l2 + hw.t_atomic + hw.t_release + hw.t_l2 * -(-f["n_split"] // pk.SUM_SPLITS)
        elif f["op"] == pk.ATTN:
            t = 2 * hw.t_l2 + min(f["k"], kv_tiles) * hw.t_dram + hw.t_atomic + hw.t_l2 + hw.t_release
        else:
            t = hw.t_dram + hw.t_release
        chain += t + waves * t_inst
    stream = nbytes / (per_sm * hw.num_sms)
    step = max(stream, chain) + hw.t_launch
    roofline = nbytes / (hw.bandwidth_gbps * 1e3)
    return dict(rows=schedule.max_rows, instructions=len(rows), stages=len(stages), mbytes=nbytes / 1e6,
                instructions_per_program=len(rows) / programs, tile_us=t_inst, stream_us=stream, chain_us=chain,
                step_us=step, roofline_us=roofline, roofline_share=roofline / step,
                tokens_per_s=schedule.max_rows * 1e6 / step)


def main(argv: list[str] | None = None) -> int:
    """`python -m gpt2_engine.persistent_decode`: the time model of a preset (fp16, random weights, on CPU)."""
    import argparse

    from gpt2_engine.kv_cache import allocate_kv_cache
    from gpt2_engine.config import PRESETS
    from gpt2_engine.weights import random_state_dict

    parser = argparse.ArgumentParser(prog="python -m gpt2_engine.persistent_decode", description=main.__doc__)
    parser.add_argument("--model", default="gpt2", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--context", type=int, default=512, help="context length of every row (default 512)")
    args = parser.parse_args(argv)
    cfg = PRESETS[args.model]
    if not 1 <= args.context <= cfg.n_positions:
        raise ValueError(f"--context must be in 1..{cfg.n_positions}, got {args.context}")
    model = PagedGPT2(cfg, random_state_dict(cfg), backend="triton", dtype=torch.float16)
    pd = PersistentDecode(model, allocate_kv_cache(cfg, 1, 16, torch.float16, "cpu"), 16)
    for batch in args.batch:
        est = time_model(pd.schedule(batch), context_len=args.context)
        print(f"{args.model} B={batch} (bucket {est['rows']}): {est['instructions']} instructions in {est['stages']} "
              f"stages, {est['mbytes']:.0f} MB; stream {est['stream_us']:.0f} us, chain {est['chain_us']:.0f} us -> "
              f"{est['step_us']:.0f} us/step, {100 * est['roofline_share']:.0f}% of the roofline "
              f"({est['roofline_us']:.0f} us), {batch * 1e6 / est['step_us']:,.0f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
