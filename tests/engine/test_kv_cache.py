"""The K/V cache tensors: copy-on-write copies in every layer, and the pools' size."""
import torch

from gpt2_engine.config import GPT2Config
from gpt2_engine.kv_cache import allocate_kv_cache, copy_blocks, num_kv_blocks


def test_copy_on_write_copies_every_layer():
    cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    kv = allocate_kv_cache(cfg, num_blocks=4, block_size=2, dtype=torch.float32, device=torch.device("cpu"))
    kv.normal_()
    before = kv.clone()
    copy_blocks(kv, [(1, 3), (0, 2)])
    assert torch.equal(kv[:, :, 3], before[:, :, 1]) and torch.equal(kv[:, :, 2], before[:, :, 0])
    assert torch.equal(kv[:, :, :2], before[:, :, :2])


def test_pool_sizing_from_budget_and_cap():
    cfg = GPT2Config(vocab_size=11, n_positions=64, n_embd=8, n_layer=2, n_head=2)
    per_block = 2 * 2 * 16 * 8 * 4                       # K and V, layers, block_size, n_embd, fp32 bytes
    cpu = torch.device("cpu")
    assert num_kv_blocks(cfg, 16, torch.float32, cpu, max_num_seqs=100, budget_bytes=10 * per_block + 5) == 10
    assert num_kv_blocks(cfg, 16, torch.float32, cpu, max_num_seqs=3) == 3 * 4   # capped at 3 full sequences
