"""`gpt2-engine bench --speculative K`: plain greedy decoding against speculative decoding on the same
model in one run, side by side: decode tok/s, the paired speedup, acceptance rate, mean accepted
length, and whether the tokens are identical to plain decoding's.

The model: a preset's seeded random weights (--model gpt2, the default) or a checkpoint (--model DIR
or a hub id), where acceptance is that of the trained weights. Rows: plain decoding; self-drafting
with the model's own int8 twin; n-gram prompt lookup; and a separate draft model (a
distilgpt2-shaped random model, seed + 1). With random weights that pair
agrees only by chance, so its row shows the cost of drafting with near-zero acceptance; the speed
claim rests on self-drafting. Decode tok/s counts the tokens after the first (the prefill step's)
over the time from the end of the prefill step to the last token; repeats are interleaved and the
speedup is the median of per-repeat ratios to plain decoding.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch

from gpt2_engine.api import GPT2
from gpt2_engine.bench.stepping import off_main_thread
from gpt2_engine.config import PRESETS
from gpt2_engine.model import PagedGPT2
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.speculative import NgramProposer, Speculation
from gpt2_engine.weights import random_state_dict

DRAFT_SHAPE = dict(n_layer=6, n_embd=768, n_head=12)    # distilgpt2's shape


@dataclass
class SpeculativeRow:
    system: str
    batch: int
    decode_tok_s: float
    decode_runs: list[float]
    speedup: float | None = None         # paired median against plain decoding
    acceptance: float | None = None      # accepted drafts / drafted
    mean_accepted_length: float | None = None   # tokens per sequence per verification step (bonus included)
    identical: bool | None = None        # tokens equal to plain decoding's


@dataclass
class SpeculativeReport:
    model: str
    weights: str
    device: str
    num_speculative_tokens: int
    prompt_len: int
    new_tokens: int
    repeats: int
    rows: list[SpeculativeRow] = field(default_factory=list)


def _speculations(model: GPT2, k: int, seed: int, methods: list[str]) -> dict[str, Speculation | None]:
    engine, rows = model.engine, {"plain": None}
    if "int8" in methods:
        int8 = PagedGPT2(model.config, model.state_dict(), backend=model.backend, device=model.device,
                         dtype=model.dtype, quantization="int8")
        rows[f"int8 self-draft, k={k}"] = Speculation(engine.draft_proposer(int8), k)
    if "ngram" in methods:
        rows[f"n-gram lookup, k={k}"] = Speculation(NgramProposer(), k)
    if "draft" in methods:
        draft_config = dataclasses.replace(model.config, **DRAFT_SHAPE)
        draft = PagedGPT2(draft_config, random_state_dict(draft_config, seed=seed + 1), backend=model.backend,
                          device=model.device, dtype=model.dtype)
        rows[f"draft model (distilgpt2 shape, random), k={k}"] = Speculation(engine.draft_proposer(draft), k)
    return rows


def _generate(model: GPT2, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float, int]:
    """Drive the engine (off the main thread: bench.stepping): the first step prefills every
    prompt; returns the tokens, the decode seconds after that step, and the tokens generated in them."""
    return off_main_thread(lambda: _steps(model.engine, prompts, params))


def _steps(engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float, int]:
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    tokens = {i: [] for i in ids}
    for event in engine.step():
        tokens[event.request_id].append(event.token_id)
    start, first = time.perf_counter(), sum(map(len, tokens.values()))
    while engine.has_unfinished_requests():
        for event in engine.step():
            tokens[event.request_id].append(event.token_id)
    seconds = time.perf_counter() - start
    return [tokens[i] for i in ids], seconds, sum(map(len, tokens.values())) - first


def run(args, device: torch.device, dtype: torch.dtype) -> SpeculativeReport:
    k, batches = args.speculative, args.batch_sizes
    block_size = 16
    # a pool sized for the run (each proposer gets as many blocks again)
    num_blocks = max(batches) * -(-(args.prompt_len + args.new_tokens + k + 1) // block_size) + 8
    runtime = dict(device=device, dtype=dtype, block_size=block_size, num_blocks=num_blocks,
                   max_num_batched_tokens=max(batches) * args.prompt_len)
    model = (GPT2.from_config(args.model, seed=args.seed, **runtime) if args.model in PRESETS
             else GPT2.from_pretrained(args.model, **runtime))
    config = model.config
    speculations = _speculations(model, k, args.seed, args.speculative_methods)
    stats = model.engine.speculative_stats
    torch.manual_seed(args.seed)
    prompts = {b: torch.randint(0, config.vocab_size, (b, args.prompt_len)).tolist() for b in batches}
    params = {name: SamplingParams(max_new_tokens=args.new_tokens, speculation=spec) for name, spec in speculations.items()}
    for name in speculations:           # warm-up: weights faulted in, paths probed
        for b in batches:
            _generate(model, prompts[b], SamplingParams(max_new_tokens=3, speculation=speculations[name]))
    runs = {(name, b): [] for name in speculations for b in batches}
    counts = {(name, b): [0, 0, 0, 0] for name in speculations for b in batches}   # drafted, accepted, steps, emitted
    outputs = {}
    grid = [(r, b, name) for r in range(args.repeats) for b in batches for name in speculations]
    for n, (r, b, name) in enumerate(grid, 1):
        print(f"bench --speculative: run {n}/{len(grid)}: {name}, batch {b}, repeat {r + 1}", flush=True)
        before = (stats.drafted, stats.accepted, stats.steps, stats.emitted)
        tokens, seconds, generated = _generate(model, prompts[b], params[name])
        after = (stats.drafted, stats.accepted, stats.steps, stats.emitted)
        counts[(name, b)] = [c + a - s for c, a, s in zip(counts[(name, b)], after, before)]
        runs[(name, b)].append(generated / seconds)
        outputs[(name, b)] = tokens
    report = SpeculativeReport(args.model, model.source, _device_name(device), k, args.prompt_len, args.new_tokens,
                               args.repeats)
    for b in batches:
        plain = runs[("plain", b)]
        for name in speculations:
            drafted, accepted, steps, emitted = counts[(name, b)]
            row = SpeculativeRow(name, b, statistics.median(runs[(name, b)]), runs[(name, b)])
            if name != "plain":
                row.speedup = statistics.median(s / p for s, p in zip(runs[(name, b)], plain))
                row.acceptance = accepted / drafted if drafted else 0.0
                row.mean_accepted_length = emitted / steps if steps else 0.0
                row.identical = outputs[(name, b)] == outputs[("plain", b)]
            report.rows.append(row)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from gpt2_engine import cpu_gemm

    return f"CPU ({cpu_gemm.cpu_signature()}, {torch.get_num_threads()} threads)"


def format_markdown(report: SpeculativeReport) -> str:
    lines = [f"Speculative decoding: {report.model} ({report.weights}) on {report.device}; prompt {report.prompt_len}, "
             f"{report.new_tokens} new tokens, greedy, {report.repeats} interleaved repeats (median decode tok/s)", "",
             "| system | batch | decode tok/s | vs plain | acceptance | mean accepted length | tokens identical |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in report.rows:
        extra = ("", "", "", "") if row.speedup is None else (
            f"{row.speedup:.2f}x", f"{100 * row.acceptance:.0f}%", f"{row.mean_accepted_length:.2f}",
            "yes" if row.identical else "NO")
        lines.append(f"| {row.system} | {row.batch} | {row.decode_tok_s:,.1f} | " + " | ".join(extra) + " |")
    return "\n".join(lines) + "\n"
