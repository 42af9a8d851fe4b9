"""The bench command end to end on a tiny checkpoint: it runs, and what it writes is complete."""
import json

import torch

from engine.bench import decode_bytes_per_step, flops_per_token
from engine.cli import main
from engine.config import GPT2Config
from tests.engine.tiny_models import tiny_hf_model


def test_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    tiny_hf_model(vocab_size=211, n_embd=32, n_layer=2, n_head=2, n_positions=64).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "results"
    assert main(["bench", "--model", str(tmp_path / "ckpt"), "--batch-sizes", "1", "3", "--prompt-len", "8",
                 "--new-tokens", "5", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    systems = {r["system"] for r in report["results"]}
    assert systems == {"gpt2-engine (torch)", "eager baseline", "transformers generate"}
    assert {r["batch"] for r in report["results"]} == {1, 3}
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_roofline_pct"] > 0
               for r in report["results"])
    assert report["versions"]["torch"] and report["bandwidth_gb_s"] > 0
    assert (out / "decode_tokens_per_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "gpt2-engine (torch)" in table and "vs transformers" in table
    assert "| gpt2-engine (torch) | 3 |" in capsys.readouterr().out


def test_roofline_counts_weights_once_and_kv_per_token():
    config = GPT2Config.preset("gpt2")
    weights_fp16 = decode_bytes_per_step(config, torch.float16, 0, 0)
    assert weights_fp16 == 2 * 124_439_808  # ~249 MB: DESIGN's ~247 MB per batch-1 step
    per_token_kv = decode_bytes_per_step(config, torch.float16, 1, 1) - weights_fp16
    assert per_token_kv == 2 * 12 * 768 * 2  # K and V, 12 layers, 768 wide, 2 bytes
    assert flops_per_token(config, 0) == 2 * (124_439_808 - 1024 * 768)


def test_cli_reports_bad_input_as_an_error_line(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert main(["bench", "--batch-sizes", "0"]) == 2
    assert "--batch-sizes must be positive" in capsys.readouterr().err
    assert main(["bench", "--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err
