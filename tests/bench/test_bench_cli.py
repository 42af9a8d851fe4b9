"""The bench command end to end on a tiny checkpoint: it runs, and what it writes is complete."""
import json
import multiprocessing
import sys

import pytest
import torch

from gpt2_engine.bench import ctranslate2_peer, llama_cpp_peer
from gpt2_engine.bench.decode import BenchReport, Measurement, decode_bytes_per_step, flops_per_token, format_markdown
from gpt2_engine.cli import main
from gpt2_engine.config import GPT2Config
from tests.engine.tiny_models import tiny_hf_model


def test_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    tiny_hf_model(vocab_size=211, n_embd=32, n_layer=2, n_head=2, n_positions=64).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "results"
    assert main(["bench", "--model", str(tmp_path / "ckpt"), "--batch-sizes", "3", "1", "--prompt-len", "8",
                 "--new-tokens", "5", "--systems", "engine", "eager", "transformers", "ctranslate2", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    systems = {r["system"] for r in report["results"]}
    expected = {"gpt2-engine (torch)", "gpt2-engine int8 (torch)", "eager baseline", "transformers generate"}
    if ctranslate2_peer.available():
        expected |= {"CTranslate2 fp32", "CTranslate2 int8"}
    assert systems == expected
    assert [r["batch"] for r in report["results"]][::len(systems)] == [1, 3]
    assert report["bandwidth_method"] == "C++ streaming read"
    assert report["repeats"] == 3 and len(report["bandwidth_runs"]) == 3 * 2 * len(systems) and report["bandwidth_gb_s"] > 0
    for r in report["results"]:
        assert len(r["decode_runs"]) == len(r["bandwidth_runs"]) == 3 and r["decode_min"] <= r["decode_tokens_per_s"] <= r["decode_max"]
        assert r["decode_spread"] == pytest.approx((r["decode_max"] - r["decode_min"]) / r["decode_tokens_per_s"])
        assert r["prefill_tokens_per_s"] > 0 and r["decode_roofline_pct"] > 0
        assert (r["speedup_vs_ctranslate2"] is not None) == (ctranslate2_peer.available() and r["system"].startswith("gpt2-engine"))
    assert report["timestamp"] and report["threads"] == torch.get_num_threads() and "signature" in report["cpu"]
    assert report["versions"]["torch"] and "flags" in report["cpu"] and report["gemm_paths"]
    assert (out / "decode_tokens_per_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "gpt2-engine (torch)" in table and "vs transformers" in table and "min-max" in table
    captured = capsys.readouterr()
    assert "| gpt2-engine int8 (torch) | 3 |" in captured.out
    assert "gpt2-engine (torch), batch 3, repeat 3/3" in captured.err   # the progress bar names what runs
    # before the bar: what it loads and warms up (the silent first minute of a GPT-2 small run)
    assert "gpt2-engine bench: loading" in captured.err and "gpt2-engine bench: warming up eager baseline" in captured.err


def test_bench_speculative_reports_every_method_beside_plain_decoding(tmp_path, capsys):
    """--speculative: plain, int8 self-drafting and n-gram rows per batch, with acceptance and mean
    accepted length, and greedy tokens identical to plain decoding's (checked by the run itself)."""
    tiny_hf_model(vocab_size=211, n_embd=32, n_layer=2, n_head=2, n_positions=64).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "spec"
    assert main(["bench", "--speculative", "2", "--model", str(tmp_path / "ckpt"), "--batch-sizes", "1", "2", "--prompt-len", "8",
                 "--new-tokens", "6", "--repeats", "1", "--speculative-methods", "int8", "ngram", "--out", str(out)]) == 0
    report = json.loads((out / "speculative.json").read_text())
    assert [(r["system"], r["batch"]) for r in report["rows"]] == [
        (system, b) for b in (1, 2) for system in ("plain", "int8 self-draft, k=2", "n-gram lookup, k=2")]
    for row in report["rows"]:
        assert row["decode_tok_s"] > 0 and len(row["decode_runs"]) == 1
        if row["system"] != "plain":
            assert row["identical"] is True and 0 <= row["acceptance"] <= 1 and row["speedup"] > 0
            assert 1 <= row["mean_accepted_length"] <= 3
    assert "| int8 self-draft, k=2 | 2 |" in (out / "speculative.md").read_text()
    assert "bench --speculative: run 6/6" in capsys.readouterr().out


def test_bench_runs_the_engine_in_every_dtype_side_by_side(tmp_path):
    """--dtype fp32 bf16 fp16: one engine row per dtype (16-bit weights streamed on CPU), int8 beside
    them, in one run; the report names every dtype."""
    tiny_hf_model(vocab_size=211, n_embd=32, n_layer=2, n_head=2, n_positions=64).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "results"
    assert main(["bench", "--model", str(tmp_path / "ckpt"), "--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "4",
                 "--repeats", "2", "--systems", "engine", "--dtype", "fp32", "bf16", "fp16", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["dtype"] == "float32, bfloat16, float16"
    assert [r["system"] for r in report["results"]] == ["gpt2-engine fp32 (torch)", "gpt2-engine bf16 (torch)",
                                                        "gpt2-engine fp16 (torch)", "gpt2-engine int8 (torch)"]
    assert all(r["decode_tokens_per_s"] > 0 and len(r["decode_runs"]) == 2 for r in report["results"])


def _measurement(system, runs, **ratios):
    median = sorted(runs)[len(runs) // 2]
    return Measurement(system, 1, 100.0, median, min(runs), max(runs), (max(runs) - min(runs)) / median, runs, 50.0,
                       1e3 / median, **ratios)


def test_table_shows_spread_ratios_and_warnings():
    report = BenchReport("gpt2", "w", "cpu", "float32", 8, 5, 3, 10.0, [10.0] * 3, "torch sum", 1, 1, "t", {}, 2, {},
                         results=[_measurement("a", [10.0, 10.5, 9.8], speedup_vs_transformers=1.5),
                                  _measurement("b", [10.0, 14.0, 9.0])],
                         warnings=["warning: b at batch 1: decode tok/s spread 50%"])
    table = format_markdown(report)
    assert "| a | 1 | 100 | 10.0 | 9.8-10.5 | 7% |" in table and "| 1.50x | - | - |" in table
    assert "read bandwidth 10.0 GB/s (torch sum)" in table
    assert "| b | 1 | 100 | 10.0 | 9.0-14.0 | 50% |" in table and table.rstrip().endswith("spread 50%")


def test_paired_ratios_pair_runs_of_the_same_repeat():
    from gpt2_engine.bench.decode import _paired_ratio

    # a burst of load in repeat 2 slows both systems: pairs see 2x throughout, unpaired medians would not
    assert _paired_ratio([20.0, 5.0, 22.0], [10.0, 2.5, 11.0]) == 2.0


@pytest.mark.skipif(not ctranslate2_peer.available(), reason="ctranslate2 (extra 'peers') is not installed")
def test_ctranslate2_peer_generates_what_the_engine_generates():
    from gpt2_engine.api import GPT2
    from gpt2_engine.bench.decode import StepClock, build_hf_model

    model = GPT2.from_hf(tiny_hf_model(vocab_size=211, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    peer = ctranslate2_peer.CTranslate2Peer(build_hf_model(model, compiled=False), "float32", torch.device("cpu"))
    prompts = torch.randint(0, 210, (2, 7), generator=torch.Generator().manual_seed(0))
    clock = StepClock(torch.device("cpu"))
    ids = ctranslate2_peer.run_ctranslate2(peer, prompts, 6, clock)
    expected = model.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=None)[:, 7:]
    assert ids == expected.tolist() and len(clock.stamps) == 6
    workers = [p for p in multiprocessing.active_children() if p.name == "ctranslate2-float32"]
    assert len(workers) == 1 and "ctranslate2" not in sys.modules   # its native code runs in the worker only
    peer.close()
    assert not workers[0].is_alive()


def test_llama_cpp_takes_gpt2_vocabulary_only(tmp_path):
    hf = tiny_hf_model(vocab_size=211, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    with pytest.raises(ValueError, match="GPT-2's own vocabulary"):
        llama_cpp_peer.convert(hf, tmp_path, "f32")
    assert "vocabulary" in llama_cpp_peer.skip_reason(torch.device("cpu"), 211)
    assert llama_cpp_peer.skip_reason(torch.device("cuda"), 50257) == "llama.cpp runs on the CPU here"


@pytest.mark.skipif(not llama_cpp_peer.available(), reason="llama.cpp is not built (make llama-cpp)")
@pytest.mark.parametrize("gguf_type", ["F32", "Q8_0"])
def test_llama_cpp_peer_generates_what_the_engine_generates(gguf_type):
    """GPT-2's shape at 2 layers (the converter takes GPT-2's vocabulary only); F32 greedy ids equal the
    engine's; Q8_0's (weights and activations rounded) agree on most."""
    from gpt2_engine.api import GPT2
    from gpt2_engine.bench.decode import StepClock, build_hf_model

    model = GPT2.from_config(GPT2Config(n_layer=2), seed=0, backend="torch")
    peer = llama_cpp_peer.LlamaCppPeer(build_hf_model(model, compiled=False), gguf_type, max_batch=2, max_tokens=16)
    prompts = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(0))
    clock = StepClock(torch.device("cpu"))
    ids = llama_cpp_peer.run_llama_cpp(peer, prompts, 6, clock)
    expected = model.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=None)[:, 7:].tolist()
    agree = sum(a == b for row, want in zip(ids, expected) for a, b in zip(row, want)) / 12
    assert len(clock.stamps) == 6 and (ids == expected if gguf_type == "F32" else agree >= 0.5), (ids, expected)
    workers = [p for p in multiprocessing.active_children() if p.name == f"llama.cpp-{gguf_type}"]
    assert len(workers) == 1 and "llama_cpp" not in sys.modules   # its native code runs in the worker only
    peer.close()
    assert not workers[0].is_alive()


def test_roofline_counts_weights_once_and_kv_per_token():
    config = GPT2Config.preset("gpt2")
    weights_fp16 = decode_bytes_per_step(config, torch.float16, 0, 0)
    assert weights_fp16 == 2 * 124_439_808  # ~249 MB: DESIGN's ~247 MB per batch-1 step
    assert decode_bytes_per_step(config, torch.float16, 0, 0, int8=True) == 124_439_808   # int8 weights: a byte each
    per_token_kv = decode_bytes_per_step(config, torch.float16, 1, 1) - weights_fp16
    assert per_token_kv == 2 * 12 * 768 * 2  # K and V, 12 layers, 768 wide, 2 bytes
    # bf16 weights on CPU: 2 bytes per weight, fp32 K and V
    assert decode_bytes_per_step(config, torch.bfloat16, 1, 1, kv_dtype=torch.float32) == weights_fp16 + 2 * 12 * 768 * 4
    assert flops_per_token(config, 0) == 2 * (124_439_808 - 1024 * 768)


def test_cli_reports_bad_input_as_an_error_line(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert main(["bench", "--batch-sizes", "0"]) == 2
    assert "--batch-sizes must be positive" in capsys.readouterr().err
    assert main(["bench", "--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be positive" in capsys.readouterr().err
    assert main(["bench", "--speculative", "2", "--dtype", "fp32", "bf16"]) == 2
    assert "--speculative runs in one --dtype" in capsys.readouterr().err
    assert main(["generate", "--random-weights", "--model", "gpt2", "--prompt", "hi", "--backend", "eager",
                 "--quantization", "int8"]) == 2
    assert "torch or triton backend" in capsys.readouterr().err
