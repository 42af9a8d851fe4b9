"""batch_invariant=True: a request's logits, at prefill and at every decode step, are bitwise the
same alone, batched with other requests of any lengths (arriving at any time), with its prompt
prefilled whole or in chunks, and with or without the prefix cache; on the torch backend and on
the triton backend (Triton's interpreter on CPU)."""
import os

import pytest
import torch

from gpt2_engine import cpu_gemm
from gpt2_engine.batch_invariant import ROW_BLOCK, row_blocked
from gpt2_engine.config import GPT2Config
from gpt2_engine.llm_engine import LLMEngine
from gpt2_engine.model import PagedGPT2
from gpt2_engine.weights import random_state_dict
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.kernels.fused_linear import ln_linear_ref

CONFIG = GPT2Config(vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=96, eos_token_id=96)
STATE = random_state_dict(CONFIG, seed=1)
PROMPT = [5, 7, 9, 11, 3, 2, 1, 8, 8, 4, 6, 30, 31]
OTHERS = [list(range(40, 90)), [1, 2], list(range(60, 65)) * 5, [17] * 9]


def logits_of(model, others=(), arrivals=(), max_num_batched_tokens=None, enable_prefix_caching=True, new=6):
    """Per step, the logits row of the request under test ([prefill, decode 1, ...])."""
    llm = LLMEngine(model, block_size=4, num_blocks=200, batch_invariant=True,
                    max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching)
    target = llm.add_request(PROMPT, SamplingParams(max_new_tokens=new, output_scores=True))
    pending = sorted(zip(arrivals, others), key=lambda item: item[0])
    rows, step, target_finished = [], 0, False
    while not target_finished:        # the others' later steps cannot change the target's rows
        while pending and pending[0][0] <= step:
            llm.add_request(pending.pop(0)[1], SamplingParams(max_new_tokens=10))
        for event in llm.step():
            if event.request_id == target:
                rows.append(event.scores)
                target_finished = event.finished
        step += 1
    return torch.stack(rows)


@pytest.fixture(scope="module", params=["torch", "triton"])
def model(request):
    """The triton backend runs under the interpreter on CPU, on the GPU when there is one."""
    device = "cuda" if request.param == "triton" and torch.cuda.is_available() else "cpu"
    return PagedGPT2(CONFIG, STATE, backend=request.param, device=device)


@pytest.fixture
def rows_computed_alike(model, monkeypatch):
    """On a GPU every row of a tl.dot tile goes through the same MMA instructions, which is what
    makes a row's result independent of its position in a row block. Triton's interpreter computes
    tl.dot with numpy's matmul instead, and some CPUs' OpenBLAS kernels round a row differently by
    its position in the matrix (seen with the AVX2 kernels: up to 2e-6 at 16 x 16 x 64). Under the
    interpreter the dot is therefore computed row by row here, one code path for every row, so that
    this test checks the engine's invariance rather than the host BLAS's."""
    if model.backend != "triton" or os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    def create_dot_by_rows(self, a, b, d, input_precision, max_num_imprecise_acc):
        assert a.data.ndim == 2, "the engine's kernels make 2-D dots"
        product = np.stack([np.matmul(row[None, :], b.data, dtype=d.data.dtype)[0] for row in a.data])
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot_by_rows)


@pytest.mark.usefixtures("rows_computed_alike")
def test_logits_are_bitwise_the_same_alone_batched_chunked_and_cached(model):
    alone = logits_of(model)
    scenarios = {
        "batched with longer and shorter requests": dict(others=OTHERS, arrivals=[0, 0, 2, 3]),
        "prefilled in chunks of 5 alongside others": dict(others=OTHERS[:2], arrivals=[0, 1], max_num_batched_tokens=5),
        "no prefix cache": dict(others=OTHERS[:1], arrivals=[1], enable_prefix_caching=False),
    }
    if model.backend == "torch":       # the interpreter is slow: the triton case keeps to the first two
        scenarios["behind a cached copy of its prefix"] = dict(others=[PROMPT[:8] + [50, 51]], arrivals=[0])
    else:
        scenarios.pop("no prefix cache")
    for name, kwargs in scenarios.items():
        batched = logits_of(model, **kwargs)
        assert torch.equal(batched, alone), f"{name}: max |diff| {(batched - alone).abs().max().item():.2e}"


def test_cached_prefix_gives_the_logits_of_a_full_prefill():
    """A prompt whose prefix was cached by an earlier request (computing only its suffix) has the
    logits it has on a fresh engine."""
    model = PagedGPT2(CONFIG, STATE, backend="torch")
    fresh = logits_of(model, new=3)
    llm = LLMEngine(model, block_size=4, num_blocks=200, batch_invariant=True)
    llm.add_request(PROMPT + [1, 2, 3], SamplingParams(max_new_tokens=2))
    while llm.has_unfinished_requests():
        llm.step()
    target = llm.add_request(PROMPT, SamplingParams(max_new_tokens=3, output_scores=True))
    rows = []
    while llm.has_unfinished_requests():
        rows += [e.scores for e in llm.step() if e.request_id == target]
    assert llm.stats()["prefix_cache_hits"] == 12
    assert torch.equal(torch.stack(rows), fresh)


def gemm_paths():
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 200) * 0.1, torch.randn(200)
    paths = {"addmm": lambda x: ln_linear_ref(x, None, None, weight, bias)}
    for candidate in cpu_gemm.float_candidates(torch.float32):   # every path the CPU probe may pick
        linear = cpu_gemm.prepare_linear(weight.t(), cpu_gemm.Epilogue(bias=True), candidates=[candidate])
        paths[candidate.name] = lambda x, linear=linear: linear(x, bias)
    return paths


@pytest.mark.parametrize("path", list(gemm_paths()))
def test_row_blocked_gemm_rows_do_not_depend_on_the_row_count(path):
    """The premise of row blocking, on this CPU's GEMM paths: at M = ROW_BLOCK a row's result does
    not depend on the other rows or its position, so row_blocked(op) gives every row the same
    bits for any M."""
    op = row_blocked(gemm_paths()[path])
    x = torch.randn(3 * ROW_BLOCK + 5, 64)
    reference = torch.cat([op(x[i:i + 1]) for i in range(x.shape[0])])
    for num_rows in (2, 3, 4, ROW_BLOCK - 1, ROW_BLOCK, ROW_BLOCK + 1, x.shape[0]):
        assert torch.equal(op(x[:num_rows]), reference[:num_rows]), num_rows
    shifted = op(torch.cat([x[7:], x[:7]]))
    assert torch.equal(shifted, torch.cat([reference[7:], reference[:7]]))
