"""decode_kernel="persistent" through the public API (triton backend under Triton's interpreter): greedy
tokens identical to the torch backend, steps it does not cover on the multi-launch path (said once in
the log), and the option's errors. The kernel's numerics are tested in tests/kernels/test_persistent_decode.py."""
import logging

import pytest
import torch

from gpt2_engine import GPT2
from gpt2_engine.cli import build_parser, main
from tests.engine.tiny_models import left_padded_batch, tiny_hf_model


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(vocab_size=101, n_embd=48, n_layer=2, n_head=3, n_positions=64)


def test_greedy_tokens_match_torch_backend(hf_model):
    torch.manual_seed(0)
    ids, mask = left_padded_batch([3, 6], hf_model.config.vocab_size)
    persistent = GPT2.from_hf(hf_model, backend="triton", decode_kernel="persistent", device="cpu")
    expected = GPT2.from_hf(hf_model, backend="torch", device="cpu").generate(ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(persistent.generate(ids, attention_mask=mask, max_new_tokens=4), expected)
    assert list(persistent.engine.runner.persistent.schedules) == [2]   # the decode steps ran the persistent kernel


def test_uncovered_steps_fall_back_and_say_so_once(hf_model, caplog):
    torch.manual_seed(1)
    ids, mask = left_padded_batch([2] * 17, hf_model.config.vocab_size)
    model = GPT2.from_hf(hf_model, backend="triton", decode_kernel="persistent", device="cpu")
    expected = GPT2.from_hf(hf_model, backend="torch", device="cpu").generate(ids, attention_mask=mask, max_new_tokens=2)
    with caplog.at_level(logging.INFO, logger="gpt2_engine.model_runner"):
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=2), expected)
    told = [r for r in caplog.records if "persistent decode covers" in r.getMessage()]
    assert len(told) == 1 and "17 rows" in told[0].getMessage()
    assert not model.engine.runner.persistent.schedules


def test_decode_kernel_errors(hf_model):
    with pytest.raises(ValueError, match="decode_kernel must be one of"):
        GPT2.from_hf(hf_model, backend="torch", decode_kernel="fast", device="cpu")
    with pytest.raises(ValueError, match="decode_kernel='persistent' needs backend='triton'"):
        GPT2.from_hf(hf_model, backend="torch", decode_kernel="persistent", device="cpu")
    with pytest.raises(ValueError, match="decode_kernel='persistent' needs backend='triton'"):
        GPT2.from_hf(hf_model, backend="triton", decode_kernel="persistent", quantization="int8", device="cpu")


@pytest.mark.parametrize("command", [["generate"], ["serve"], ["bench"]])
def test_cli_flag(command):
    args, _ = build_parser().parse_known_args(command + ["--decode-kernel", "persistent"])
    assert args.decode_kernel == "persistent"
    assert build_parser().parse_known_args(command)[0].decode_kernel == "graphs"


def test_cli_persistent_on_torch_backend_is_one_error_line(tmp_path, capsys):
    hf = tiny_hf_model(vocab_size=50257, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    hf.save_pretrained(tmp_path)
    capsys.readouterr()
    code = main(["generate", "--model", str(tmp_path), "--device", "cpu", "--backend", "torch", "--prompt", "hi",
                 "--decode-kernel", "persistent"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "decode_kernel='persistent'" in err[0]
