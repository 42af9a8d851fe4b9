"""GPT-2 forward over a packed step on the paged KV cache, through the kernel launchers.

A step packs T tokens: first the prefill tokens (whole prompts or chunks of them) of some
sequences, then one decode token of each of the others. Per layer:

    qkv = ln_linear(x; ln_1, attn.c_attn)            [T, 3C]; q, k, v are strided views [T, H, D];
          the same launch writes k, v to the layer's K/V pools at slot_mapping (kv_cache=...)
    a   = flash_attention(prefill rows) ++ paged_decode_attention(decode rows)       [T, H, D]
    x   = ln_linear(a; attn.c_proj) + x
    x   = ln_gelu_mlp(x; ln_2, mlp.c_fc, mlp.c_proj)   (adds x)

then ln_f and the LM head (wte^T) on the rows whose logits are needed, returned in fp32. backend
"triton" runs the kernels' launchers, "torch" their `_ref` twins (one ops table, no per-call switch).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from gpt2_engine import torch_backend
from gpt2_engine.config import GPT2Config
from gpt2_engine.host_staging import PinnedStaging
from gpt2_engine.kernels import flash_attention, fused_linear, int8_linear, paged_attention
from gpt2_engine.quantization import Int8Weight, check_quantization


@dataclass(frozen=True)
class KernelOps:
    ln_linear: Callable
    ln_gelu_mlp: Callable
    flash_attention: Callable
    paged_decode_attention: Callable

    @classmethod
    def for_backend(cls, backend: str) -> "KernelOps":
        suffixes = {"triton": "", "torch": "_ref"}
        if backend not in suffixes:
            raise ValueError(f"backend must be one of {sorted(suffixes)}, got {backend!r}")
        modules = {"ln_linear": fused_linear, "ln_gelu_mlp": fused_linear, "flash_attention": flash_attention,
                   "paged_decode_attention": paged_attention}
        return cls(**{f.name: getattr(modules[f.name], f.name + suffixes[backend]) for f in fields(cls)})


def int8_kernel_ops(backend: str) -> dict:
    """ln_linear / ln_gelu_mlp for int8 weights on the int8 kernel ("triton") or its reference: an
    Int8Weight (no LayerNorm on triton), or a FoldedInt8Linear (triton: the LayerNorm folded
    in at load, its statistics accumulated inside the GEMM)."""
    launch = int8_linear.int8_ln_linear if backend == "triton" else int8_linear.int8_ln_linear_ref

    def ln_linear(x, ln_weight, ln_bias, weight, bias=None, **kwargs):
        if isinstance(weight, Int8Weight):
            return launch(x, ln_weight, ln_bias, weight.q, weight.scale, bias, **kwargs)
        return launch(x, ln_weight, ln_bias, weight, None, bias, **kwargs)

    return {"ln_linear": ln_linear, "ln_gelu_mlp": torch_backend.mlp_of(ln_linear)}


@dataclass(frozen=True)
class Affine:            # a LayerNorm's or a Conv1D's parameters; Conv1D weight is [in, out]
    weight: torch.Tensor | torch_backend.CpuLinear | Int8Weight   # CpuLinear: the CPU torch backend's probed path
    bias: torch.Tensor | None


@dataclass(frozen=True)
class Attention:
    c_attn: Affine
    c_proj: Affine


@dataclass(frozen=True)
class MLP:
    c_fc: Affine
    c_proj: Affine


@dataclass(frozen=True)
class Block:
    ln_1: Affine
    attn: Attention
    ln_2: Affine
    mlp: MLP


@dataclass
class StepInputs:
    """Device tensors of one packed step (built once per step on the host, moved in one go).

    Prefill rows are 0 .. num_prefill_tokens-1, decode rows the rest."""
    embed_indices: torch.Tensor             # int64 [2T]: (token id, vocab_size + position) per token
    embed_offsets: torch.Tensor             # int64 [T]: 0, 2, 4, ... (embedding_bag sums each pair)
    num_prefill_tokens: int
    slot_mapping: torch.Tensor | None = None    # int64 [T]; None = no cache (no KV write)
    cu_seqlens_q: torch.Tensor | None = None    # int32 [P+1] prefill sequences' query rows
    cu_seqlens_k: torch.Tensor | None = None    # int32 [P+1] their keys (cached prefix + chunk), when
    key_slots: torch.Tensor | None = None       # int64 [sum Lk]  some chunk has a cached prefix
    block_tables: torch.Tensor | None = None    # int32 [Bd, max_blocks] decode rows
    context_lens: torch.Tensor | None = None    # int32 [Bd]
    logits_indices: torch.Tensor | None = None  # int64 [N]; None = every row


class PagedGPT2:
    def __init__(self, config: GPT2Config, state_dict: dict[str, torch.Tensor], *, backend: str = "torch",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, quantization: str | None = None):
        self.config, self.backend = config, backend
        self.device, self.dtype = torch.device(device), dtype
        self.quantization = check_quantization(quantization)
        self.ops = KernelOps.for_backend(backend)
        # The torch backend's decode attention: on CPU our C++ kernel, else the gather index built once per
        # step; on CPU it runs each GEMM on the path a load-time probe picked for it (engine/torch_backend.py,
        # cpu_gemm.py).
        cpu_paths = backend == "torch" and torch_backend.supported(self.device, dtype)
        if backend == "torch":
            self.ops = dataclasses.replace(self.ops, paged_decode_attention=torch_backend.decode_attention(self.device, dtype))
        if cpu_paths:
            self.ops = dataclasses.replace(self.ops, ln_linear=torch_backend.ln_linear, ln_gelu_mlp=torch_backend.ln_gelu_mlp)
        elif self.quantization:
            self.ops = dataclasses.replace(self.ops, **int8_kernel_ops(backend))

        def param(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise ValueError(f"state dict has no {name!r}")
            return state_dict[name].to(device=self.device, dtype=dtype).contiguous()

        def affine(prefix: str) -> Affine:
            return Affine(param(prefix + ".weight"), param(prefix + ".bias"))

        def linear(weight_out_in: torch.Tensor | Int8Weight, epilogue: torch_backend.Epilogue):
            """A [out, in] weight for the CPU torch backend's probed path, or as int8 codes for the kernels."""
            if self.quantization and not isinstance(weight_out_in, Int8Weight):
                weight_out_in = Int8Weight.quantize(weight_out_in)
            return torch_backend.prepare_linear(weight_out_in, epilogue) if cpu_paths else weight_out_in

        def prepared(conv: Affine, **epilogue) -> Affine:
            """A Conv1D as loaded ([in, out] weight) made ready for the backend's linear."""
            if cpu_paths or self.quantization:
                return Affine(linear(conv.weight.t(), torch_backend.Epilogue(bias=True, **epilogue)), conv.bias)
            return conv

        def conv1d(prefix: str, **epilogue) -> Affine:
            return prepared(affine(prefix), **epilogue)

        def ln_then(ln: Affine, conv: Affine, **epilogue) -> tuple[Affine, Affine]:
            """LN then a Conv1D as loaded ([in, out], float). triton backend: the LayerNorm folded into the
            linear (fused_linear.fold_layernorm; int8: fold_layernorm_int8, which quantizes the folded weight),
            the LN left as Affine(None, None); other backends keep the LN and prepare the linear."""
            if backend != "triton":
                return ln, prepared(conv, **epilogue)
            fold = int8_linear.fold_layernorm_int8 if self.quantization else fused_linear.fold_layernorm
            return Affine(None, None), Affine(fold(ln.weight, ln.bias, conv.weight, conv.bias), None)

        def block(i: int) -> Block:
            ln_1, c_attn = ln_then(affine(f"h.{i}.ln_1"), affine(f"h.{i}.attn.c_attn"))
            ln_2, c_fc = ln_then(affine(f"h.{i}.ln_2"), affine(f"h.{i}.mlp.c_fc"), gelu=True)
            return Block(ln_1, Attention(c_attn, conv1d(f"h.{i}.attn.c_proj", residual=True)), ln_2,
                         MLP(c_fc, conv1d(f"h.{i}.mlp.c_proj", residual=True)))

        # wte and wpe stacked in one table so that one embedding_bag computes wte[id] + wpe[pos];
        # int8: wte's codes serve the lookup and the tied LM head, wpe stays (engine/quantization.py).
        wte = param("wte.weight")
        if self.quantization:
            self.embedding, self.wpe = Int8Weight.quantize(wte), param("wpe.weight")
        else:
            self.embedding = torch.cat([wte, param("wpe.weight")])      # [V + n_positions, C]
        self.h = [block(i) for i in range(config.n_layer)]
        # CPU, every linear on the streaming GEMM: decode-only steps run each block as one C++ call
        self.decode_blocks = (torch_backend.fused_decode_blocks(self.h, config.n_head, config.layer_norm_epsilon)
                              if cpu_paths else None)
        self.ln_f = affine("ln_f")
        # LM head from the [V, C] weight: on CPU the probed path's layout; on GPU a [C, V] view of the
        # tied wte (no second copy of the largest matrix; the GEMM reads W column-major, which tl.dot
        # handles); int8: the embedding's codes, except on triton, where ln_f's gamma is folded in first.
        int8_codes = self.quantization and backend != "triton"
        head = param("lm_head.weight") if "lm_head.weight" in state_dict else (
            self.embedding if int8_codes else wte if self.quantization else self.embedding[:config.vocab_size])
        if cpu_paths or int8_codes:
            self.lm_head = linear(head, torch_backend.Epilogue())
        else:
            self.lm_head = head.t().contiguous() if self.device.type == "cpu" else head.t()
        if backend == "triton":   # ln_f folded into a copy of the head (fp: K-major, as fold_layernorm keeps strides)
            self.ln_f, lm_head = ln_then(self.ln_f, Affine(self.lm_head, None))
            self.lm_head = lm_head.weight

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv_cache: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits [N, V] for the rows in step.logits_indices (all rows when None)."""
        ops, cfg = self.ops, self.config
        x = self._embed(step)                                                                    # [T, C]
        num_tokens = x.shape[0]
        fused = self.decode_blocks is not None and step.num_prefill_tokens == 0 and kv_cache is not None
        for i, blk in enumerate(self.h):
            k_cache, v_cache = (kv_cache[i, 0], kv_cache[i, 1]) if kv_cache is not None else (None, None)
            if fused:   # the whole block in one call, bitwise equal to the ops below
                x = self.decode_blocks[i](x, k_cache, v_cache, step.slot_mapping, step.block_tables, step.context_lens)
                continue
            # the QKV GEMM's epilogue also stores this step's K/V rows into the pools (before attention reads them)
            kv_write = (k_cache, v_cache, step.slot_mapping) if step.slot_mapping is not None else None
            qkv = ops.ln_linear(x, blk.ln_1.weight, blk.ln_1.bias, blk.attn.c_attn.weight, blk.attn.c_attn.bias,
                                eps=cfg.layer_norm_epsilon, kv_cache=kv_write)
            # [T, 3C] -> three strided [T, H, D] views (row stride 3C), no copies
            q, k, v = qkv.view(num_tokens, 3, cfg.n_head, cfg.head_dim).unbind(1)
            a = self._attention(q, k, v, k_cache, v_cache, step)
            x = ops.ln_linear(a.view(num_tokens, cfg.n_embd), None, None, blk.attn.c_proj.weight, blk.attn.c_proj.bias,
                              residual=x)
            x = ops.ln_gelu_mlp(x, blk.ln_2.weight, blk.ln_2.bias, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias,
                                blk.mlp.c_proj.weight, blk.mlp.c_proj.bias, eps=cfg.layer_norm_epsilon)
        if step.logits_indices is not None:
            x = x[step.logits_indices]
        logits = ops.ln_linear(x, self.ln_f.weight, self.ln_f.bias, self.lm_head, None, eps=cfg.layer_norm_epsilon)
        return logits.float()

    def _embed(self, step: StepInputs) -> torch.Tensor:
        if isinstance(self.embedding, Int8Weight):
            pairs = step.embed_indices.view(-1, 2)   # (token id, vocab_size + position)
            return self.embedding.rows(pairs[:, 0], self.dtype) + self.wpe[pairs[:, 1] - self.config.vocab_size]
        return F.embedding_bag(step.embed_indices, self.embedding, step.embed_offsets, mode="sum")

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """fp32 logits [L_i, V] at every position of each prompt: one packed prefill, no cache."""
        lengths = [len(prompt) for prompt in prompts]
        step = pack_step(self.config.vocab_size, self.device, token_ids=[t for prompt in prompts for t in prompt],
                         positions=[p for n in lengths for p in range(n)], num_prefill_tokens=sum(lengths),
                         cu_seqlens_q=[0, *itertools.accumulate(lengths)])
        return list(self.forward(step, None).split(lengths))

    def _attention(self, q, k, v, k_cache, v_cache, step: StepInputs) -> torch.Tensor:
        parts, p = [], step.num_prefill_tokens
        if p:
            if step.key_slots is not None:
                # chunks with a cached prefix: every prefill sequence's keys 0 .. Lk-1 read back from the
                # cache, where this layer's QKV GEMM has just put the chunk's own K/V
                k, v = (cache.flatten(0, 1)[step.key_slots] for cache in (k_cache, v_cache))
            else:
                k, v = k[:p], v[:p]
            parts.append(self.ops.flash_attention(q[:p], k, v, step.cu_seqlens_q, cu_seqlens_k=step.cu_seqlens_k))
        if p < q.shape[0]:
            parts.append(self.ops.paged_decode_attention(q[p:], k_cache, v_cache, step.block_tables, step.context_lens))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def pack_step(vocab_size: int, device: torch.device, *, token_ids: list[int], positions: list[int],
              num_prefill_tokens: int, cu_seqlens_q: list[int] | None = None, slot_mapping: list[int] | None = None,
              cu_seqlens_k: list[int] | None = None, key_slots: list[int] | None = None,
              block_tables: list[list[int]] | None = None, context_lens: list[int] | None = None,
              logits_indices: list[int] | None = None, staging: PinnedStaging | None = None,
              pending_tokens: torch.Tensor | None = None, pending_rows: list[int] | None = None,
              pending_index: list[int] | None = None) -> StepInputs:
    """StepInputs from host lists: one host-to-device copy per integer dtype (on CUDA non-blocking,
    through `staging`'s pinned buffers), then views. Token rows `pending_rows` hold placeholders for
    ids known only on the device (async scheduling: tokens the previous step sampled): row
    pending_rows[i] takes pending_tokens[pending_index[i]], gathered on the device, so in stream order
    after the step that wrote them."""
    embed = [i for pair in zip(token_ids, (vocab_size + p for p in positions)) for i in pair]
    offsets = list(range(0, len(embed), 2))
    width = max(map(len, block_tables)) if block_tables else 0
    tables = [b for row in block_tables for b in row + [0] * (width - len(row))] if block_tables else None  # pad: block 0
    pending_at = [2 * row for row in pending_rows] if pending_rows else None    # the token's place in embed_indices
    int64 = _to_device(torch.int64, device, staging, embed_indices=embed, embed_offsets=offsets,
                       slot_mapping=slot_mapping, key_slots=key_slots, logits_indices=logits_indices,
                       pending_at=pending_at, pending_index=pending_index if pending_at else None)
    int32 = _to_device(torch.int32, device, staging, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       block_tables=tables, context_lens=context_lens)
    if tables is not None:
        int32["block_tables"] = int32["block_tables"].view(len(block_tables), width)
    pending_at, pending_index = int64.pop("pending_at"), int64.pop("pending_index")
    if pending_at is not None:
        int64["embed_indices"][pending_at] = pending_tokens[pending_index]
    return StepInputs(num_prefill_tokens=num_prefill_tokens, **int64, **int32)


def _to_device(dtype: torch.dtype, device: torch.device, staging: PinnedStaging | None,
               **lists: list[int] | None) -> dict[str, torch.Tensor | None]:
    present = {name: values for name, values in lists.items() if values is not None}
    if not present:
        return dict.fromkeys(lists)
    flat = [x for values in present.values() for x in values]
    tensor = staging.upload(flat, dtype) if staging is not None else torch.tensor(flat, dtype=dtype).to(device)
    parts = dict(zip(present, tensor.split([len(values) for values in present.values()])))
    return {name: parts.get(name) for name in lists}
