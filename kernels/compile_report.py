"""Ahead-of-time GPU compile report for every shipped kernel configuration.

Each kernel module exposes `aot_kernels() -> list[AotKernel]`: the exact configurations its
launcher can pick (derived from the same heuristic tables the launcher uses). This module
compiles each one for sm_80 (A100) and sm_90 (H100) with `triton.compile` and a `GPUTarget`
(no GPU needed) and reads the result with the cuobjdump shipped inside triton's package:

    registers      REG from `cuobjdump -res-usage`
    spills         STACK + LOCAL bytes (must be 0: a spill means local-memory traffic in the loop)
    shared memory  dynamic shared memory from the compiled metadata (Triton allocates it all
                   dynamically), checked against the per-block limit of the target
    tensor cores   HMMA (mma.sync, sm_80+) / HGMMA (wgmma, sm_90) instructions inside the SASS's
                   loop bodies (the address ranges [target, branch] of backward branches), i.e. in
                   the main loops, not in a prologue, an epilogue or a dead path
    vector stores  STG.E.128 in the SASS, for configurations that must store 16-byte vectors (the
                   LM head, whose odd N would otherwise force scalar stores)
    prefetch       LDGSTS (cp.async) inside the loop bodies, for loops that must prefetch their
                   next tiles (paged decode attention)
    loads first    for the persistent decode kernel: a plain 16-byte global load (LDG.E.128, the
                   weight tile) issued before the first acquire poll (LDG.E.STRONG.GPU then
                   CCTL.IVALL: Triton's acquire load), and the first tensor-core instruction (if any) after it

Run it as `gpt2-engine kernels` (gpt2_engine.cli_kernels); it exits non-zero when a
configuration fails to compile, spills, exceeds shared memory, lacks the tensor-core instructions
it is expected to use in its main loop, lacks the vector stores it must make, or does not prefetch
where it must.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

KERNEL_MODULES = tuple(f"gpt2_engine.kernels.{name}" for name in (
    "flash_attention", "fused_linear", "paged_attention", "int8_linear", "persistent_decode"))
TARGETS = (80, 90)
# Largest dynamic shared memory one block may opt into: A100 163 KiB, H100 227 KiB.
MAX_SHARED_BYTES = {80: 166_912, 90: 232_448}


@dataclass(frozen=True)
class AotKernel:
    """One shipped configuration of a @triton.jit kernel, described for an AOT compile.

    signature maps every non-constexpr parameter to its Triton type ("*fp16", "i32", "fp32");
    constexprs maps every constexpr parameter to its value. `aligned` names the parameters the
    launcher guarantees divisible by 16 (data pointers from torch allocations, strides of
    GPT-2-sized tensors), as the JIT would specialise them at launch; it decides whether loads
    vectorise, so it must describe real launches.
    """

    label: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    aligned: tuple[str, ...] = ()
    tensor_cores: bool = True   # the SASS's loops must hold HMMA/HGMMA
    wgmma_on_sm90: bool = False  # on sm_90 it must be HGMMA specifically (large-tile GEMM/attention)
    vector_store: bool = False   # the SASS must hold 16-byte global stores (STG.E.128)
    async_copies: bool = False   # the SASS's loops must hold cp.async (LDGSTS): a prefetching loop
    loads_before_wait: bool = False  # a persistent kernel: global loads issued ahead of an acquire poll loop


@dataclass
class ReportRow:
    label: str
    target: str
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    tensor_core_ops: str = "-"
    mma_in_loops: int = 0
    mma_total: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in triton's package at {path}")
    return path


def compile_kernel(spec: AotKernel, capability: int):
    """Compile one configuration for sm_<capability>; returns triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(spec.fn.arg_names)
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(names)
    missing = set(names) - set(spec.signature) - set(spec.constexprs)
    if unknown or missing:
        raise ValueError(f"{spec.label}: signature/constexprs mismatch: unknown {sorted(unknown)}, missing {sorted(missing)}")
    signature = {n: ("constexpr" if n in spec.constexprs else spec.signature[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    src = triton.compiler.ASTSource(fn=spec.fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )


def inspect_kernel(spec: AotKernel, capability: int) -> ReportRow:
    row = ReportRow(spec.label, f"sm_{capability}")
    try:
        compiled = compile_kernel(spec, capability)
    except Exception as exc:  # a compile failure is a report row, not a crash of the report
        row.problems.append(f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return row
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[-1]))
    row.registers = int(fields.get("REG", 0))
    row.spill_bytes = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
    row.shared_bytes = max(int(compiled.metadata.shared), int(fields.get("SHARED", 0)))
    hgmma, hmma = (counts_in_loops(sass, op) for op in ("HGMMA", "HMMA"))
    kind, (in_loops, total) = ("HGMMA", hgmma) if hgmma[1] else ("HMMA", hmma)
    row.mma_in_loops, row.mma_total = in_loops, total
    row.tensor_core_ops = f"{kind} {in_loops}/{total} in loops" if total else "none"

    if row.spill_bytes:
        row.problems.append(f"{row.spill_bytes} bytes spilled")
    if row.shared_bytes > MAX_SHARED_BYTES[capability]:
        row.problems.append(f"shared memory {row.shared_bytes} > {MAX_SHARED_BYTES[capability]}")
    if spec.tensor_cores and not row.mma_in_loops:
        row.problems.append("no tensor-core instructions in a loop" if row.mma_total else "no tensor-core instructions")
    if spec.tensor_cores and spec.wgmma_on_sm90 and capability >= 90 and not hgmma[0]:
        row.problems.append("no HGMMA (wgmma) in a loop on sm_90")
    if spec.vector_store and not re.search(r"\bSTG\.E\.128\b", sass):
        row.problems.append("no 16-byte vector stores")
    if spec.async_copies and not counts_in_loops(sass, "LDGSTS")[0]:
        row.problems.append("no cp.async (LDGSTS) in a loop: the loop does not prefetch")
    if spec.loads_before_wait and not loads_before_wait(sass):
        row.problems.append("no 16-byte weight load issued before the first acquire poll")
    return row


def loads_before_wait(sass: str) -> bool:
    """A plain LDG.E.128 precedes the first acquire poll (an LDG.E.STRONG.GPU followed by CCTL.IVALL,
    the L1 invalidation of an acquire), and the first HMMA/HGMMA, if any, follows it, in program order."""
    texts = [text for _, text in _SASS_LINE.findall(sass)]
    poll = next((i for i, text in enumerate(texts[:-1])
                 if re.search(r"\bLDG\.E\.STRONG\.GPU\b", text) and "CCTL.IVALL" in texts[i + 1]), None)
    if poll is None:
        return False
    plain_before = any(re.search(r"\bLDG\.E\.128\b", text) and "STRONG" not in text for text in texts[:poll])
    mma = next((i for i, text in enumerate(texts) if re.search(r"\bH(G)?MMA\.", text)), None)
    return plain_before and (mma is None or mma > poll)    # fp32 tiles use FMA dots: no MMA at all


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)")


def counts_in_loops(sass: str, op: str) -> tuple[int, int]:
    """(instructions `op` (e.g. HMMA, LDGSTS) inside loop bodies, all of them) in cuobjdump SASS. A loop body is the
    address range [target, branch] of a branch whose target lies before it (a back edge)."""
    instructions = [(int(addr, 16), text) for addr, text in _SASS_LINE.findall(sass)]
    loops = [(int(m.group(1), 16), addr) for addr, text in instructions
             if (m := _BRANCH.search(text)) and int(m.group(1), 16) < addr]
    pattern = re.compile(rf"\b{op}\.")
    sites = [addr for addr, text in instructions if pattern.search(text)]
    return sum(any(lo <= a <= hi for lo, hi in loops) for a in sites), len(sites)


def shipped_kernels(modules: tuple[str, ...] = KERNEL_MODULES) -> list[AotKernel]:
    specs: list[AotKernel] = []
    for name in modules:
        specs.extend(importlib.import_module(name).aot_kernels())
    return specs


def build_report(specs: list[AotKernel], targets: tuple[int, ...] = TARGETS) -> list[ReportRow]:
    """One row per (configuration, target), in that order. The builds run on one thread per core:
    Triton's compiler passes and ptxas run outside the GIL, so this scales with the cores."""
    jobs = [(spec, cap) for spec in specs for cap in targets]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: inspect_kernel(*job), jobs))


def format_table(rows: list[ReportRow]) -> str:
    header = ("kernel", "target", "regs", "spills", "shared B", "tensor cores", "status")
    body = [
        (r.label, r.target, str(r.registers), str(r.spill_bytes), str(r.shared_bytes), r.tensor_core_ops,
         "ok" if r.ok else "FAIL: " + "; ".join(r.problems))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*line) for line in body)])
