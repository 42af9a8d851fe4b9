"""The decode launch plan: every decode GEMM of GPT-2 small..xl, on fp16 weights and on int8 codes,
fills the GPU at every M, a row's K split never depends on M, and `gpt2-engine kernels --plan`
writes the table (int8 launches included) as JSON."""
import json

import pytest
import torch

from gpt2_engine.cli import main as cli_main
from gpt2_engine.config import PRESETS
from gpt2_engine.kernels.launch_plan import PLAN_MS, PROGRAMS_PER_SM, SPLIT_MAX_M, gemm_plan, plan_table


@pytest.mark.parametrize("num_sms", [132, 108, 78])   # H100 SXM / A100 / H20
def test_every_decode_gemm_launches_two_programs_per_sm(num_sms):
    rows = plan_table(PRESETS, num_sms)
    gemms = [r for r in rows if r["kind"] == "gemm"]
    assert {r["M"] for r in gemms} == set(PLAN_MS) and {r["model"] for r in gemms} == set(PRESETS)
    short = [r for r in gemms if r["programs"] < PROGRAMS_PER_SM * num_sms]
    assert not short, short[:3]
    # every M from 1 to 256, not only the table's
    for cfg in PRESETS.values():
        C = cfg.n_embd
        for K, N in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, cfg.vocab_size)):
            for M in range(1, SPLIT_MAX_M + 1):
                for int8 in (False, True):
                    plan = gemm_plan(M, N, K, torch.float16, 90, num_sms, int8=int8)
                    assert plan.programs >= PROGRAMS_PER_SM * num_sms, (M, K, N, int8)


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_split_depends_on_k_n_dtype_only(dtype, int8):
    for cfg in PRESETS.values():
        C = cfg.n_embd
        for K, N in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, cfg.vocab_size)):
            plans = {M: gemm_plan(M, N, K, dtype, 90, 132, int8=int8) for M in range(1, SPLIT_MAX_M + 1)}
            reductions = {(p.split, p.k_per_split, p.tile.block_k, p.tile.block_n) for p in plans.values()}
            assert len(reductions) == 1, (K, N, reductions)
            assert all(p.k_per_split % p.tile.block_k == 0 and -(-K // p.k_per_split) == p.split for p in plans.values())


def test_int8_plan_takes_128_byte_code_segments_where_they_fill_the_gpu():
    """int8 codes: BLOCK_K 128 where it reaches 2 x SMs programs, 64 where K is too short for it
    (GPT-2 small's c_attn / attn.c_proj, K = 768 = 6 blocks of 128); fp16 weights stay at 64."""
    assert gemm_plan(1, 3072, 768, torch.float16, 90, 132, int8=True).tile.block_k == 128    # small mlp.c_fc
    assert gemm_plan(1, 768, 768, torch.float16, 90, 132, int8=True).tile.block_k == 64      # small attn.c_proj
    assert gemm_plan(1, 3072, 768, torch.float16, 90, 132).tile.block_k == 64
    assert gemm_plan(1, 768, 3072, torch.float32, 90, 132, int8=True).tile.block_k == 32
    assert gemm_plan(300, 768, 3072, torch.float16, 90, 132, int8=True).tile_name == "int8_prefill"


def test_attention_split_is_a_fixed_chunk():
    rows = [r for r in plan_table(PRESETS, 132) if r["kind"] == "attention"]
    assert len({(r["split"], r["k_per_split"]) for r in rows}) == 1   # same for every batch size and model


def test_cli_plan_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert cli_main(["kernels", "--plan", "--sms", "132", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert rows and all({"model", "launch", "kind", "M", "K", "N", "split", "programs"} <= set(r) for r in rows)
    assert {r["kind"] for r in rows} == {"gemm", "attention"}
    int8 = [r for r in rows if r["launch"].endswith(" int8")]
    assert len(int8) == 140 and {r["weights"] for r in int8} == {"int8"} and {r["kind"] for r in int8} == {"gemm"}
    out = capsys.readouterr().out
    assert "280 of 280 decode GEMM launches" in out
    assert cli_main(["kernels", "--plan", "--sms", "0"]) == 2
