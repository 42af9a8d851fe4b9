"""`python -m benchmarks.gpu_check --dry-run` (what `make gpu-check` runs on a GPU, at tiny sizes under
Triton's interpreter): every section runs, the correctness rows pass, results.json / results.md are
written and the printed table fits in 40 lines. Keeps the GPU script from rotting between GPU runs."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the script sets it itself
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--dry-run"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    sections = {r["section"] for r in report["rows"]}
    assert sections == {"tests", "copy", "flash", "paged", "gemm", "launch", "e2e", "graphs", "bf16"}
    assert not [r for r in report["rows"] if r["status"] in ("FAIL", "error")]
    assert {r["section"] for r in report["rows"] if r["status"] == "ok"} >= sections - {"tests"}
    assert (tmp_path / "results.md").read_text().startswith("# gpu_check")
    printed = proc.stdout.strip().splitlines()
    assert 0 < len(printed) <= 40 and printed[0].startswith("gpu_check on")
