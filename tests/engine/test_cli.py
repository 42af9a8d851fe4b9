"""The gpt2-engine command line on a tiny checkpoint written here: generate prints what the public API
returns for the same options (the CLI's defaults are the API's), and every bad flag or input of generate
and bench is exit status 2 with exactly one stderr line, before any model is built where it can be."""
import io
import os
import subprocess
import sys

import pytest
import torch

import gpt2_engine.bench.decode
from gpt2_engine import GPT2
from gpt2_engine.cli import main
from tests.engine.tiny_models import tiny_hf_model

PROMPT = "Hello world, this is"
# A CUDA device this machine does not have.
ABSENT_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's vocabulary (its tokenizer: the BPE packaged with gpt2-engine)."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_hf_model(vocab_size=50257, n_embd=32, n_layer=1, n_head=2, n_positions=64).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def api(checkpoint):
    return GPT2.from_pretrained(checkpoint, device="cpu")


def generate(checkpoint, capsys, *flags, prompt=PROMPT):
    argv = ["generate", "--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "6", *flags]
    code = main(argv + (["--prompt", prompt] if prompt is not None else []))
    return code, capsys.readouterr()


def assert_one_error_line(code, captured, command, *phrases):
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
    assert lines[0].startswith(f"gpt2-engine {command}: error: "), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# --- generate: the API's results ---------------------------------------------------------------------


@pytest.mark.parametrize("flags, options", [
    ([], {}),                                                      # greedy, as the API by default
    (["--do-sample", "--seed", "7"], {"do_sample": True, "seed": 7}),  # top_k 50, top_p 1, temperature 1
    (["--do-sample", "--seed", "3", "--top-k", "0", "--top-p", "0.9", "--temperature", "0.7", "--repetition-penalty", "1.3"],
     {"do_sample": True, "seed": 3, "top_k": 0, "top_p": 0.9, "temperature": 0.7, "repetition_penalty": 1.3}),
    (["--do-sample", "--temperature", "0"], {}),                   # temperature 0 is greedy decoding
    (["--assistant-model", "int8", "--num-assistant-tokens", "3"], {}),   # assisted greedy: plain greedy's tokens
    (["--prompt-lookup", "3"], {}),
])
def test_generate_prints_the_apis_continuation(checkpoint, api, capsys, flags, options):
    code, captured = generate(checkpoint, capsys, *flags)
    assert code == 0 and captured.err == ""
    assert captured.out == PROMPT + api.generate_text(PROMPT, max_new_tokens=6, **options)[0] + "\n"


def test_generate_defaults_sample_with_the_apis_top_k(checkpoint, api, capsys):
    # top_k=50 (the API's default) and top_k=0 give different draws for this seed; the CLI must match 50
    default = api.generate_text(PROMPT, max_new_tokens=6, do_sample=True, seed=11)[0]
    assert default != api.generate_text(PROMPT, max_new_tokens=6, do_sample=True, seed=11, top_k=0)[0]
    assert generate(checkpoint, capsys, "--do-sample", "--seed", "11")[1].out == PROMPT + default + "\n"


def test_generate_several_sequences_and_stream(checkpoint, api, capsys):
    code, captured = generate(checkpoint, capsys, "--do-sample", "--seed", "5", "--num-return-sequences", "3")
    assert code == 0
    expected = api.generate_text(PROMPT, max_new_tokens=6, do_sample=True, seed=5, num_return_sequences=3)
    # each sequence under a header line: they may span lines themselves
    assert captured.out == "".join(f"--- sequence {i + 1} of 3 ---\n{PROMPT}{text}\n" for i, text in enumerate(expected))
    code, captured = generate(checkpoint, capsys, "--stream", "--do-sample", "--seed", "5")
    assert code == 0 and captured.out == PROMPT + expected[0] + "\n"


def test_generate_reads_the_prompt_from_stdin(checkpoint, api, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))  # echo's trailing newline is not prompt
    code, captured = generate(checkpoint, capsys, prompt=None)
    assert code == 0 and captured.out == PROMPT + api.generate_text(PROMPT, max_new_tokens=6)[0] + "\n"


def test_generate_dtype(checkpoint, capsys):
    bf16 = GPT2.from_pretrained(checkpoint, device="cpu", dtype="bf16")
    code, captured = generate(checkpoint, capsys, "--dtype", "bf16")
    assert code == 0 and captured.out == PROMPT + bf16.generate_text(PROMPT, max_new_tokens=6)[0] + "\n"


def test_generate_random_weights_with_no_flags_and_no_network(tmp_path):
    """The issue's command as a user types it: the gpt2 preset, no tokenizer given, nothing cached."""
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "gpt2_engine.cli", "generate", "--random-weights", "--prompt", "Hi",
                             "--max-new-tokens", "2", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hi") and len(result.stdout) > len("Hi\n") and result.stderr == ""
    assert list(cache.iterdir()) == []


# --- generate: bad flags and inputs -------------------------------------------------------------------


@pytest.mark.parametrize("flags, phrases", [
    (["--temperature", "-1"], ["--temperature -1.0", "--do-sample"]),   # would be ignored when greedy
    (["--top-k", "5", "--top-p", "0.5"], ["--top-k 5 --top-p 0.5 apply only when sampling", "--do-sample"]),
    (["--do-sample", "--temperature", "-1"], ["temperature", "-1"]),
    (["--do-sample", "--temperature", "nan"], ["temperature", "nan"]),
    (["--do-sample", "--top-p", "0"], ["top_p"]),
    (["--do-sample", "--top-p", "1.5"], ["top_p", "1.5"]),
    (["--do-sample", "--top-k", "-1"], ["top_k", "-1"]),
    (["--top-k", "2.5"], ["--top-k", "2.5"]),
    (["--do-sample", "--repetition-penalty", "0"], ["repetition_penalty"]),
    (["--num-return-sequences", "2"], ["num_return_sequences", "do_sample"]),
    (["--stream", "--do-sample", "--num-return-sequences", "2"], ["num_return_sequences"]),
    (["--max-new-tokens", "0"], ["max_new_tokens"]),
    (["--max-new-tokens", "100"], ["n_positions=64"]),
    (["--dtype", "fp8"], ["dtype", "fp8"]),
    (["--backend", "bogus"], ["backend", "bogus"]),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--device", ABSENT_CUDA], ["--device", ABSENT_CUDA]),
    (["--device", "meta"], ["--device", "meta", "not supported"]),
    (["--random-weights"], ["--random-weights", "preset"]),
    (["--tokenizer", "no-such-tokenizer-dir"], ["--tokenizer", "no-such-tokenizer-dir"]),
    (["--prompt", ""], ["prompt is empty"]),
    (["--no-such-flag"], ["--no-such-flag"]),
    (["--num-assistant-tokens", "2"], ["--num-assistant-tokens needs --assistant-model"]),
    (["--prompt-lookup", "0"], ["--prompt-lookup", "0"]),
    (["--assistant-model", "int8", "--prompt-lookup", "2"], ["assistant_model or prompt_lookup_num_tokens"]),
])
def test_generate_bad_input_is_one_error_line(checkpoint, capsys, flags, phrases):
    code, captured = generate(checkpoint, capsys, *flags, prompt=None if "--prompt" in flags else PROMPT)
    assert_one_error_line(code, captured, "generate", *phrases)
    assert captured.out == ""


def test_missing_checkpoint_and_missing_subcommand(tmp_path, capsys):
    assert_one_error_line(main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]), capsys.readouterr(),
                          "generate", "checkpoint directory not found")
    code = main([])         # no command at all: the usage, as a new user needs it
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("usage: gpt2-engine") and all(c in err for c in ("generate", "serve", "bench"))
    assert main(["generate", "--help"]) == 0 and "--do-sample" in capsys.readouterr().out


# --- bench: argument checks before anything runs ----------------------------------------------------


@pytest.fixture
def no_bench_run(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the bench started although its arguments are invalid")

    monkeypatch.setattr(gpt2_engine.bench.decode, "run_bench", fail)
    monkeypatch.setattr(gpt2_engine.bench.decode, "_systems", fail)


def bench(checkpoint, capsys, *flags):
    code = main(["bench", "--model", str(checkpoint), "--prompt-len", "8", "--new-tokens", "4", *flags])
    return code, capsys.readouterr()


def test_bench_prompt_len_beyond_the_context(checkpoint, capsys, no_bench_run):
    code, captured = bench(checkpoint, capsys, "--prompt-len", "61")  # + 4 new tokens > n_positions 64
    assert_one_error_line(code, captured, "bench", "--prompt-len 61", "n_positions=64")
    assert_one_error_line(*bench("gpt2", capsys, "--prompt-len", "5000"), "bench", "--prompt-len 5000", "n_positions=1024")


@pytest.mark.parametrize("device", ["bogus", ABSENT_CUDA], ids=["bogus", "absent-gpu"])  # id "cuda" would mark it a GPU test
def test_bench_bad_device(checkpoint, capsys, no_bench_run, device):
    assert_one_error_line(*bench(checkpoint, capsys, "--device", device), "bench", "--device", device)


def test_bench_out_must_be_writable(checkpoint, capsys, no_bench_run, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert_one_error_line(*bench(checkpoint, capsys, "--out", str(a_file)), "bench", f"--out {a_file}", "not a directory")
    below_a_file = a_file / "results"
    assert_one_error_line(*bench(checkpoint, capsys, "--out", str(below_a_file)), "bench", f"--out {below_a_file}",
                          "not a writable directory")
    (tmp_path / "out" / "results.json").mkdir(parents=True)  # a directory where a result file goes
    assert_one_error_line(*bench(checkpoint, capsys, "--out", str(tmp_path / "out")), "bench", "results.json")


@pytest.mark.parametrize("flags, phrases", [
    (["--max-new-token", "3"], ["unrecognized arguments: --max-new-token"]),     # no abbreviations
    (["--num-beams", "2", "--stream"], ["--stream cannot show beam search"]),
])
def test_generate_typos_and_streamed_beams_are_refused(checkpoint, capsys, flags, phrases):
    assert_one_error_line(*generate(checkpoint, capsys, *flags), "generate", *phrases)


def test_ctrl_c_while_streaming_exits_130_without_a_traceback(checkpoint, capsys, monkeypatch):
    def interrupted(self, prompt, **options):
        yield " one"
        raise KeyboardInterrupt

    monkeypatch.setattr(GPT2, "stream", interrupted)
    code, captured = generate(checkpoint, capsys, "--stream")
    assert code == 130 and captured.out == PROMPT + " one" and "Traceback" not in captured.err


def test_bench_plot_offsets_the_systems_sideways():
    columns = [gpt2_engine.bench.decode.offset_batches([1, 8], i, 3) for i in range(3)]
    assert columns[1] == [1, 8] and columns[0][0] < 1 < columns[2][0] and columns[0][1] < 8 < columns[2][1]
    assert gpt2_engine.bench.decode.offset_batches([1, 8], 0, 1) == [1, 8]
