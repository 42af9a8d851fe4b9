"""The PyTorch eager baseline: a plain GPT-2 (unfused torch ops, contiguous KV cache).

It is the numerical reference for the runtime and the baseline in every benchmark, so it is
written the obvious way: one op per line of the math, no kernels of ours. transformers'
semantics for left padding: a padded position neither attends nor is attended to, and positions
are cumsum(attention_mask) - 1.

Cache layout: per layer K and V as [B, H, max_len, D], filled left to right; `length` columns used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2_engine.config import GPT2Config
from gpt2_engine.generation import GeneratedSequence, GenerateOptions
from gpt2_engine.sampling import SamplingParams, make_generator, sample_next_tokens


class ContiguousKVCache:
    def __init__(self, config: GPT2Config, batch: int, max_len: int, device, dtype):
        shape = (batch, config.n_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0


class EagerGPT2(torch.nn.Module):
    """GPT-2 on the canonical state dict (HF names without `transformer.`, Conv1D [in, out])."""

    def __init__(self, config: GPT2Config, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.weights = state_dict
        self.lm_head = state_dict.get("lm_head.weight", state_dict["wte.weight"])  # [V, C]

    def _w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def _layer_norm(self, x, prefix):
        return F.layer_norm(x, (x.shape[-1],), self._w(prefix + ".weight"), self._w(prefix + ".bias"), self.config.layer_norm_epsilon)

    def _conv1d(self, x, prefix):
        return x @ self._w(prefix + ".weight") + self._w(prefix + ".bias")

    def _attention(self, x, layer, cache, key_mask):
        cfg = self.config
        batch, steps, _ = x.shape
        q, k, v = self._conv1d(x, f"h.{layer}.attn.c_attn").split(cfg.n_embd, dim=-1)
        # [B, T, C] -> [B, H, T, D]
        q, k, v = (t.view(batch, steps, cfg.n_head, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        start = cache.length
        cache.keys[layer][:, :, start:start + steps] = k
        cache.values[layer][:, :, start:start + steps] = v
        keys = cache.keys[layer][:, :, :start + steps]
        values = cache.values[layer][:, :, :start + steps]
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(cfg.head_dim)          # [B, H, T, start+T]
        query_pos = torch.arange(start, start + steps, device=x.device)[:, None]
        key_pos = torch.arange(start + steps, device=x.device)[None, :]
        allowed = (key_pos <= query_pos)[None, None] & key_mask[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        # A padded query row may see no key at all: give it zero weights instead of NaN
        # (its output is never used).
        probs = torch.where(allowed.any(-1, keepdim=True), scores.softmax(-1), torch.zeros_like(scores))
        out = (probs @ values).transpose(1, 2).reshape(batch, steps, cfg.n_embd)
        return self._conv1d(out, f"h.{layer}.attn.c_proj")

    def _mlp(self, x, layer):
        hidden = F.gelu(self._conv1d(x, f"h.{layer}.mlp.c_fc"), approximate="tanh")
        return self._conv1d(hidden, f"h.{layer}.mlp.c_proj")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        """input_ids [B, T] continue the cached sequences; attention_mask [B, cache.length + T]
        covers cached and new tokens. Returns logits [B, T, V] in the model dtype."""
        steps = input_ids.shape[1]
        key_mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, cache.length:cache.length + steps]
        x = F.embedding(input_ids, self._w("wte.weight")) + F.embedding(positions, self._w("wpe.weight"))
        for layer in range(self.config.n_layer):
            x = x + self._attention(self._layer_norm(x, f"h.{layer}.ln_1"), layer, cache, key_mask)
            x = x + self._mlp(self._layer_norm(x, f"h.{layer}.ln_2"), layer)
        cache.length += steps
        return self._layer_norm(x, "ln_f") @ self.lm_head.T

    def new_cache(self, batch: int, max_len: int) -> ContiguousKVCache:
        return ContiguousKVCache(self.config, batch, max_len, self.lm_head.device, self.lm_head.dtype)


@dataclass
class _EagerSequence:
    """Sampling state of one row (the fields gpt2_engine.sampling reads)."""
    params: SamplingParams
    token_ids: list[int]
    generator: torch.Generator | None
    num_generated: int = 0
    finished: bool = False


@torch.inference_mode()
def generate_eager(model: EagerGPT2, prompts: list[list[int]], options: GenerateOptions, on_token=None) -> list[GeneratedSequence]:
    """Decode all rows in lockstep on a left-padded batch, as transformers does. Rows that hit EOS
    keep being fed a filler token (their outputs are ignored) until every row is done; the filler
    is token 0 rather than pad_token_id, which may lie outside the vocabulary.
    on_token(row, token_id) is called for each new token as it is chosen."""
    n = options.num_return_sequences
    params = options.sampling
    device = model.lm_head.device
    rows = [p for p in prompts for _ in range(n)]
    width = max(len(p) for p in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width + params.max_new_tokens), dtype=torch.long, device=device)
    for i, p in enumerate(rows):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):width] = 1
    row_params = [params.for_prompt(i // n) for i in range(len(rows))]
    seqs = [_EagerSequence(row_params[i], list(p), make_generator(row_params[i], i % n, device)) for i, p in enumerate(rows)]
    out = [GeneratedSequence() for _ in rows]
    cache = model.new_cache(len(rows), width + params.max_new_tokens)
    logits = model(input_ids, mask[:, :width], cache)[:, -1]
    for step in range(params.max_new_tokens):
        live = [i for i, s in enumerate(seqs) if not s.finished]
        sampled = sample_next_tokens(logits[live].float(), [seqs[i] for i in live])
        next_ids = [0] * len(rows)
        for i, drawn in zip(live, sampled):
            token = drawn.token_id
            next_ids[i] = token
            seq = seqs[i]
            seq.token_ids.append(token)
            seq.num_generated += 1
            out[i].tokens.append(token)
            if drawn.scores is not None:
                out[i].scores.append(drawn.scores.cpu())
            if on_token is not None:
                on_token(i, token)
            seq.finished = token in params.eos_token_ids or seq.num_generated == params.max_new_tokens
        if all(s.finished for s in seqs):
            break
        mask[:, width + step] = 1
        logits = model(torch.tensor(next_ids, device=device)[:, None], mask[:, :width + step + 1], cache)[:, -1]
    return out
