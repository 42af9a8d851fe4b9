"""CUDA graphs for decode-only steps (GPU only; on CPU the engine runs the model plainly).

One graph per batch-size bucket (1, 2, 4, 8, ... up to max_num_seqs), captured once over static
input buffers sized for the largest bucket. A step of B decode rows replays the smallest bucket
b >= B: its inputs are copied into rows 0..B-1, rows B..b-1 are padding (slot -1: the QKV GEMM's
KV write skips them; context length 1 over a valid block: the paged kernel reads one real, ignored
token), and the first B rows of the graph's logits are copied out. The paged kernel's split count
depends only on shapes (batch, heads, block-table width), never on tensor values, so it is fixed at
capture.
"""
from __future__ import annotations

import torch

from gpt2_engine.model import PagedGPT2, StepInputs
from gpt2_engine.kernels.arrival_counter import graph_buffers


class DecodeGraphs:
    def __init__(self, model: PagedGPT2, kv_cache: torch.Tensor, max_num_seqs: int, max_blocks_per_seq: int):
        self.buckets = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs] + [max_num_seqs]
        size, device = max_num_seqs, model.device
        self.embed_indices = torch.zeros(2 * size, dtype=torch.int64, device=device)
        self.embed_offsets = torch.arange(0, 2 * size, 2, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        stream, pool = torch.cuda.Stream(device), None
        # The warm-ups and captures run on a side stream (capture needs one that is not the legacy
        # default stream). It waits for everything queued so far on the current stream (the static
        # buffers' fills above, the KV cache's allocation and zeroing, the weights' uploads), and the
        # current stream waits for it at the end: work after __init__ sees the warm-ups' writes (the
        # KV cache's padding rows) and their workspaces.
        stream.wait_stream(torch.cuda.current_stream(device))
        for b in reversed(self.buckets):          # largest first, so the smaller ones reuse its pool
            step = StepInputs(self.embed_indices[:2 * b], self.embed_offsets[:b], 0, slot_mapping=self.slot_mapping[:b],
                              block_tables=self.block_tables[:b], context_lens=self.context_lens[:b])
            with torch.cuda.stream(stream):       # warm-up on the capture stream: compiles, creates workspaces
                model.forward(step, kv_cache)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            # split-K counters and workspaces private to this graph, re-armed at the start of every replay
            with torch.cuda.graph(graph, pool=pool, stream=stream), graph_buffers(device):
                self.logits[b] = model.forward(step, kv_cache)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.current_stream(device).wait_stream(stream)

    def run(self, step: StepInputs) -> torch.Tensor:
        """fp32 logits [B, V] of a decode-only step (every row samples)."""
        assert step.num_prefill_tokens == 0 and step.logits_indices is None
        n = step.context_lens.shape[0]
        b = next(size for size in self.buckets if size >= n)
        self.embed_indices[:2 * n].copy_(step.embed_indices)
        self.slot_mapping[:n].copy_(step.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.block_tables[:n, :step.block_tables.shape[1]].copy_(step.block_tables)
        self.context_lens[:n].copy_(step.context_lens)
        self.context_lens[n:b].fill_(1)
        self.graphs[b].replay()
        return self.logits[b][:n].clone()
