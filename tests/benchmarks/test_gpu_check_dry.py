"""`python -m benchmarks.gpu_check --dry-run` (what `make gpu-check` runs on a GPU, at tiny sizes under
Triton's interpreter), as on the GPU machine's image: the server's packages missing (blocked from
import here) and CI unset. Every section runs, the cuda tests collect, the correctness rows pass,
results.json / results.md are written and the printed table fits in 40 lines. Keeps the GPU script
from rotting between GPU runs."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

BLOCKED = ("fastapi", "uvicorn", "pydantic", "openai", "ray")
SECTIONS = ["tests", "graphs", "half", "persistent", "launch", "copy", "flash", "paged", "gemm", "e2e"]


def test_gpu_check_dry_run_without_server_packages(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"BLOCKED = {BLOCKED!r}\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)\n"
        "sys.meta_path.insert(0, Blocker())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CI")}   # the script sets the first
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--dry-run"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    order = list(dict.fromkeys(r["section"] for r in report["rows"]))
    assert order == SECTIONS                       # correctness first, end-to-end last
    assert not [r for r in report["rows"] if r["status"] not in ("ok", "skipped")]
    assert {r["section"] for r in report["rows"] if r["status"] == "ok"} == set(SECTIONS)
    collected = next(r for r in report["rows"] if r["section"] == "tests")
    assert "error" not in collected["note"] and "collected" in collected["note"]
    assert (out / "results.md").read_text().startswith("# gpu_check")
    printed = proc.stdout.strip().splitlines()
    assert 0 < len(printed) <= 40 and printed[0].startswith("gpu_check on")


def test_gpu_check_results_survive_each_row(tmp_path):
    """results.json is complete after every row (a run killed mid-way keeps the rows it finished)."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.gpu_check import Check

    chk = Check(dry=True, budget_s=60, out=tmp_path)
    chk.header = {"device": "test", "versions": {}}
    chk.item("copy", "first", 5, lambda: dict(value=1.0, unit="GB/s"))
    assert [r["name"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]] == ["first"]
    chk.item("copy", "second", 5, lambda: 1 / 0)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [("first", "ok"), ("second", "error")]
    chk.item("copy", "third", 1, lambda: __import__("time").sleep(5))
    assert json.loads((tmp_path / "results.json").read_text())["rows"][-1]["status"] == "timeout"
