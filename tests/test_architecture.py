"""The architecture's contracts (pyproject.toml's [tool.importlinter]) hold: kernels import nothing from
the engine, the runtime none of the CLI, server or benchmarks, and no module imports itself in a
cycle; the contracts' module lists name every module of the package, so a new module cannot slip
past them."""
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_contracts_name_every_module():
    contracts = {c["name"]: c for c in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}
    engine_modules = {f"gpt2_engine.{p.stem}" for p in (REPO_ROOT / "engine").glob("*.py") if p.stem != "__init__"}
    engine_modules |= {f"gpt2_engine.{p.parent.name}" for p in (REPO_ROOT / "engine").glob("*/__init__.py")}
    kernels = contracts["kernels import nothing from the engine"]
    assert set(kernels["forbidden_modules"]) == engine_modules
    layering = contracts["the runtime imports none of the CLI, the server or the benchmarks"]
    assert set(layering["source_modules"]) | set(layering["forbidden_modules"]) == engine_modules
    assert not set(layering["source_modules"]) & set(layering["forbidden_modules"])
