"""The distribution installs one import name, gpt2_engine, beside today's transformers: Hugging Face's
`kernels` (a dependency of transformers) and our package import in one process from the repository
root and from any other folder, and the installed console script works from any folder."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import transformers

from tests.conftest import REPO_ROOT, require_modules

BOTH = ("from transformers import GPT2LMHeadModel\n"
        "import gpt2_engine, kernels\n"
        "from gpt2_engine.kernels.fused_linear import ln_linear\n"
        "from gpt2_engine.kernels import cpu\n"
        "assert hasattr(kernels, 'get_kernel'), kernels.__file__      # Hugging Face's, not a folder of ours\n"
        "print(gpt2_engine.GPT2.__module__, GPT2LMHeadModel.__name__)\n")


def test_wheel_has_one_top_level_name(tmp_path):
    checkout = tmp_path / "checkout"        # a copy of the tracked files: the build writes nothing here
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        source = REPO_ROOT / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).write_bytes(source.read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(checkout)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("gpt2_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"gpt2_engine", wheel.name.split("-py3")[0] + ".dist-info"}
    for shipped in ("gpt2_engine/__init__.py", "gpt2_engine/kernels/fused_linear.py", "gpt2_engine/kernels/cpu/stream_gemm.cpp",
                    "gpt2_engine/kernels/cpu/kernels.h", "gpt2_engine/server/app.py", "gpt2_engine/gpt2_bpe/vocab.bpe"):
        assert shipped in names
    assert "gpt2_engine/kernels/__init__.py" not in names    # a namespace portion: it never shadows `kernels`


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_transformers_and_gpt2_engine_in_one_process(where, tmp_path):
    require_modules("kernels")          # Hugging Face's, installed with the dev extra
    cwd = REPO_ROOT if where == "repo root" else tmp_path
    done = subprocess.run([sys.executable, "-c", BOTH], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["gpt2_engine.api", "GPT2LMHeadModel"]


def test_installed_console_script_from_another_folder(tmp_path):
    script = Path(sys.executable).parent / "gpt2-engine"
    assert script.exists(), "the package is installed with its console script (make test does)"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "tiny")
    done = subprocess.run([str(script), "generate", "--model", "tiny", "--prompt", "Hello", "--max-new-tokens", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("Hello") and len(done.stdout) > len("Hello\n")
