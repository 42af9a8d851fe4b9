"""GPT-2 forward over a packed step on the paged KV cache, through the kernel launchers.

A step packs T tokens: first the prefill tokens (whole prompts or chunks of them) of some
sequences, then one decode token of each of the others. Per layer:

    qkv = qkv(x)   (ln_1, attn.c_attn)                [T, 3C]; q, k, v are strided views [T, H, D];
          the same GEMM writes k, v to the layer's K/V pools at slot_mapping (kv_cache=...)
    a   = flash_attention(prefill rows) ++ paged_decode_attention(decode rows)       [T, H, D]
    x   = attn_proj(a) + x                            (attn.c_proj)
    x   = mlp_proj(fc(x)) + x                         (ln_2, mlp.c_fc with GELU; mlp.c_proj)

then the LM head (ln_f, wte^T) on the rows whose logits are needed, returned in fp32. Each linear is
a gpt2_engine.linear.Linear prepared at load for the backend's GEMM (that module's table says which);
attention runs through AttentionOps: backend "triton" the kernels' launchers, "torch" their `_ref`
twins (on CPU the C++ decode attention).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gpt2_engine import torch_backend
from gpt2_engine.config import GPT2Config
from gpt2_engine.host_staging import PinnedStaging
from gpt2_engine.kernels import flash_attention, paged_attention
from gpt2_engine.linear import LayerNorm, Linear, LinearBuilder
from gpt2_engine.quantization import Int8Weight, check_quantization


@dataclass(frozen=True)
class AttentionOps:
    """The attention kernels of a backend (the linears are per layer: gpt2_engine.linear)."""
    flash_attention: Callable
    paged_decode_attention: Callable

    @classmethod
    def for_backend(cls, backend: str, device: torch.device, dtype: torch.dtype) -> "AttentionOps":
        """triton: the kernels' launchers; torch: flash attention's reference, and for decode our C++
        kernel on CPU, else the reference with its gather index built once per step (torch_backend)."""
        if backend == "triton":
            return cls(flash_attention.flash_attention, paged_attention.paged_decode_attention)
        if backend == "torch":
            return cls(flash_attention.flash_attention_ref, torch_backend.decode_attention(device, dtype))
        raise ValueError(f"backend must be one of ['torch', 'triton'], got {backend!r}")


@dataclass(frozen=True)
class Block:
    qkv: Linear          # ln_1 then attn.c_attn; its epilogue writes the K/V columns
    attn_proj: Linear    # attn.c_proj, + residual
    fc: Linear           # ln_2 then mlp.c_fc, GELU
    mlp_proj: Linear     # mlp.c_proj, + residual


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
        self.device = torch.device(device)
        # dtype is the weights'; activations and the KV cache use self.dtype, which differs only where
        # the torch backend streams 16-bit weights on CPU with fp32 arithmetic (torch_backend.compute_dtype)
        self.weight_dtype = dtype
        self.dtype = torch_backend.compute_dtype(self.device, dtype) if backend == "torch" else dtype
        self.quantization = check_quantization(quantization)
        self.attention_ops = AttentionOps.for_backend(backend, self.device, self.dtype)
        linears = LinearBuilder(backend, self.device, self.dtype, self.quantization, config.layer_norm_epsilon,
                                weight_dtype=dtype)

        def param(name: str) -> torch.Tensor:
            """A parameter rounded to the weight dtype, held in the compute dtype (exactly)."""
            if name not in state_dict:
                raise ValueError(f"state dict has no {name!r}")
            return state_dict[name].to(device=self.device, dtype=dtype).to(self.dtype).contiguous()

        def layer_norm(prefix: str) -> LayerNorm:
            return LayerNorm(param(prefix + ".weight"), param(prefix + ".bias"))

        def conv1d(prefix: str, ln: LayerNorm | None = None, **epilogue) -> Linear:
            """An HF Conv1D (weight [in, out]) as a Linear, after the LayerNorm `ln` if given."""
            return linears.build(param(prefix + ".weight").t(), param(prefix + ".bias"), ln, **epilogue)

        # wte and wpe stacked in one table so that one embedding_bag computes wte[id] + wpe[pos];
        # int8: wte's codes serve the lookup and the tied LM head, wpe stays (engine/quantization.py).
        wte = param("wte.weight")
        if self.quantization:
            self.embedding, self.wpe = Int8Weight.quantize(wte), param("wpe.weight")
        else:
            self.embedding = torch.cat([wte, param("wpe.weight")])      # [V + n_positions, C]
        self.h = [Block(conv1d(f"h.{i}.attn.c_attn", layer_norm(f"h.{i}.ln_1")),
                        conv1d(f"h.{i}.attn.c_proj", residual=True),
                        conv1d(f"h.{i}.mlp.c_fc", layer_norm(f"h.{i}.ln_2"), activation="gelu_tanh"),
                        conv1d(f"h.{i}.mlp.c_proj", residual=True))
                  for i in range(config.n_layer)]
        # The LM head from a [V, C] weight: lm_head.weight where given, else tied to wte: int8, wte's codes
        # (where ln_f is not folded in); else a view of the embedding table's rows (no second copy)
        if "lm_head.weight" in state_dict:
            head, codes = param("lm_head.weight"), None
        elif self.quantization:
            head, codes = wte, self.embedding
        else:
            head, codes = self.embedding[:config.vocab_size], None
        self.lm_head = linears.build(head, None, layer_norm("ln_f"), codes=codes)
        # CPU, every linear on the streaming GEMM: decode-only steps run all blocks (and the LM head where
        # it streams too) as one C++ call
        self.decode_layers = (torch_backend.fused_decode_layers(self.h, config.n_head, config.layer_norm_epsilon,
                                                                self.lm_head) if linears.cpu_paths else None)

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv_cache: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits [N, V] for the rows in step.logits_indices (all rows when None)."""
        x = self._embed(step)                                                                    # [T, C]
        if self.decode_layers is not None and step.num_prefill_tokens == 0 and kv_cache is not None:
            # every block (and the LM head where it is in the call) in one call, bitwise equal to the ops below
            out = self.decode_layers(x, kv_cache, step.slot_mapping, step.block_tables, step.context_lens)
            if self.decode_layers.lm_head is not None:   # the logits of every row
                return out if step.logits_indices is None else out[step.logits_indices]
            x = out
        else:
            x = self._blocks(x, kv_cache, step)
        if step.logits_indices is not None:
            x = x[step.logits_indices]
        return self.lm_head(x).float()

    def _blocks(self, x: torch.Tensor, kv_cache: torch.Tensor | None, step: StepInputs) -> torch.Tensor:
        """The blocks op by op: [T, C] -> [T, C]."""
        cfg, num_tokens = self.config, x.shape[0]
        for i, blk in enumerate(self.h):
            k_cache, v_cache = (kv_cache[i, 0], kv_cache[i, 1]) if kv_cache is not None else (None, None)
            # the QKV GEMM's epilogue also stores this step's K/V rows into the pools (before attention reads them)
            kv_write = (k_cache, v_cache, step.slot_mapping) if step.slot_mapping is not None else None
            qkv = blk.qkv(x, kv_cache=kv_write)
            # [T, 3C] -> three strided [T, H, D] views (row stride 3C), no copies
            q, k, v = qkv.view(num_tokens, 3, cfg.n_head, cfg.head_dim).unbind(1)
            a = self._attention(q, k, v, k_cache, v_cache, step)
            x = blk.attn_proj(a.view(num_tokens, cfg.n_embd), residual=x)
            x = blk.mlp_proj(blk.fc(x), residual=x)
        return x

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
            parts.append(self.attention_ops.flash_attention(q[:p], k, v, step.cu_seqlens_q, cu_seqlens_k=step.cu_seqlens_k))
        if p < q.shape[0]:
            parts.append(self.attention_ops.paged_decode_attention(q[p:], k_cache, v_cache, step.block_tables, step.context_lens))
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
