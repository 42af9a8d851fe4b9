"""`gpt2-engine kernels`: the ahead-of-time compile report of every shipped kernel configuration for
sm_80 and sm_90 (gpt2_engine.kernels.compile_report), or with --plan the decode launch plan of the
GPT-2 presets (gpt2_engine.kernels.launch_plan)."""
from __future__ import annotations

import json
from dataclasses import asdict

from gpt2_engine.config import PRESETS
from gpt2_engine.kernels import compile_report, launch_plan


def compile_report_main(label_filter: str, json_path: str | None) -> int:
    specs = [s for s in compile_report.shipped_kernels() if label_filter in s.label]
    rows = compile_report.build_report(specs)
    print(compile_report.format_table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], f, indent=2)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} (configuration, target) builds clean ({len(specs)} configurations)")
    return 1 if failed else 0


def format_plan(rows: list[dict]) -> str:
    cols = ("model", "launch", "M", "K", "N", "tile", "split", "programs", "bytes_per_program")
    body = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), *(fmt.format(*b) for b in body)])


def plan_main(sms: int, json_path: str | None) -> int:
    if sms < 1:
        raise ValueError(f"--sms must be >= 1, got {sms}")
    rows = launch_plan.plan_table(PRESETS, sms)
    print(format_plan(rows))
    gemms = [r for r in rows if r["kind"] == "gemm"]
    short = [r for r in gemms if r["programs"] < launch_plan.PROGRAMS_PER_SM * sms]
    print(f"\n{len(gemms) - len(short)} of {len(gemms)} decode GEMM launches (fp16 and int8 weights) have "
          f">= {launch_plan.PROGRAMS_PER_SM} x {sms} programs")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
