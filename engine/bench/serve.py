"""`gpt2-engine bench serve`: a load generator for any OpenAI-compatible /v1/completions server
(ours, vLLM, SGLang, ...), like `vllm bench serve`.

For each --concurrency C it sends --num-prompts streaming requests (stream=True) of --input-len
random token ids asking for --output-len tokens, at most C in flight at a time, and reports
request throughput, output tokens/s, TTFT (time to first token), TPOT (time per output token
after the first) and ITL (inter-token latency: the gaps between streamed chunks) as mean and
p50/p90/p99, as a table and as results.json / results.md under --out. Against a gpt2-engine
server with speculative decoding (serve --speculative-model / --speculative-ngram) it also reports
the share of drafted tokens accepted at each level (from /health).

    gpt2-engine bench serve --url http://127.0.0.1:8000 --num-prompts 64 --concurrency 1 8 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2_engine.cli_args import Parser, int_at_least

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2-engine bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    parser.add_argument("--num-prompts", type=int_at_least(1), default=64, help="requests per concurrency level (default 64)")
    parser.add_argument("--concurrency", type=int_at_least(1), nargs="+", default=[1, 8, 32], help="requests in flight (default 1 8 32)")
    parser.add_argument("--input-len", type=int_at_least(1), default=128, help="prompt tokens per request (default 128)")
    parser.add_argument("--output-len", type=int_at_least(1), default=128, help="max_tokens per request (default 128)")
    parser.add_argument("--vocab-size", type=int_at_least(1), default=50000, help="random prompt ids are drawn below this (default 50000)")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="do not send vLLM's ignore_eos=true (for servers that refuse the extension)")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--out", default=None, help="directory for results.json and results.md")
    return parser


async def _one_request(client, url: str, payload: dict) -> RequestResult:
    start = time.perf_counter()
    result, last = RequestResult(ok=False), None
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {body[:200]}")
            chunks, usage = 0, None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: "):])
                if "error" in data:
                    return RequestResult(ok=False, error=str(data["error"]))
                usage = data.get("usage") or usage
                if not data.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last, chunks = now, chunks + 1
    except Exception as exc:   # a load generator reports failed requests, it does not stop on them
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")
    result.latency = time.perf_counter() - start
    result.output_tokens = usage["completion_tokens"] if usage else chunks
    result.ok = last is not None
    return result


async def run_level(url: str, headers: dict, payloads: list[dict], concurrency: int, timeout: float) -> dict:
    import httpx
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        # on stderr, one bar per level: requests done (a run of minutes is otherwise silent)
        bar = tqdm(total=len(payloads), desc=f"concurrency {concurrency}", unit="req", file=sys.stderr)

        async def bounded(payload):
            async with semaphore:
                result = await _one_request(client, f"{url}/v1/completions", payload)
            bar.update()
            return result

        start = time.perf_counter()
        with bar:
            results = await asyncio.gather(*(bounded(p) for p in payloads))
        duration = time.perf_counter() - start
    return summarize(results, duration, concurrency)


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    row = {"concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
           "duration_s": duration, "request_throughput": len(ok) / duration, "output_throughput": output / duration,
           "total_output_tokens": output}
    samples = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
               "itl": [gap for r in ok for gap in r.itl]}
    for name, values in samples.items():
        ms = np.asarray(values) * 1e3
        row[f"mean_{name}_ms"] = float(ms.mean()) if ms.size else None
        for p in PERCENTILES:
            row[f"p{p}_{name}_ms"] = float(np.percentile(ms, p)) if ms.size else None
    errors = [r.error for r in results if not r.ok]
    if errors:
        row["first_error"] = errors[0]
    return row


COLUMNS = [("concurrency", "conc", "{}"), ("completed", "done", "{}"), ("request_throughput", "req/s", "{:.2f}"),
           ("output_throughput", "out tok/s", "{:.1f}"), ("spec_acceptance", "draft acceptance", "{:.0%}")] + [
    (f"{stat}_{name}_ms", f"{name.upper()} {stat} ms", "{:.1f}")
    for name in ("ttft", "tpot", "itl") for stat in ("mean", *(f"p{p}" for p in PERCENTILES))]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _model_name(url: str, headers: dict, timeout: float) -> str:
    import httpx

    response = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _speculative_counters(url: str, headers: dict, timeout: float) -> tuple[int, int] | None:
    """(drafted, accepted) tokens so far from a gpt2-engine server's /health (serve --speculative-*);
    None from a server that does not report them."""
    import httpx

    try:
        health = httpx.get(f"{url}/health", headers=headers, timeout=timeout).json()
        return int(health["spec_draft_tokens"]), int(health["spec_accepted_tokens"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = args.model or _model_name(url, headers, args.timeout)
    except Exception as exc:
        print(f"gpt2-engine bench serve: error: cannot list the models of {url}: {exc}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    payloads = [{"model": model, "prompt": [rng.randrange(args.vocab_size) for _ in range(args.input_len)],
                 "max_tokens": args.output_len, "temperature": 0, "stream": True,
                 "stream_options": {"include_usage": True}, **({} if args.no_ignore_eos else {"ignore_eos": True})}
                for _ in range(args.num_prompts)]
    rows = []
    for concurrency in args.concurrency:
        before = _speculative_counters(url, headers, args.timeout)
        rows.append(asyncio.run(run_level(url, headers, payloads, concurrency, args.timeout)))
        after = _speculative_counters(url, headers, args.timeout)
        if before is not None and after is not None and after[0] > before[0]:
            rows[-1]["spec_acceptance"] = (after[1] - before[1]) / (after[0] - before[0])
        if rows[-1]["failed"]:
            print(f"concurrency {concurrency}: {rows[-1]['failed']} requests failed, first: {rows[-1]['first_error']}",
                  file=sys.stderr)
    header = (f"{url} model={model} num_prompts={args.num_prompts} input_len={args.input_len} "
              f"output_len={args.output_len}")
    table = markdown_table(rows)
    print(header + "\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "api_key"} | {"model": model}
        (out / "results.json").write_text(json.dumps({"config": config, "results": rows}, indent=2))
        (out / "results.md").write_text(f"# bench serve\n\n{header}\n\n{table}\n")
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 1 if any(row["failed"] for row in rows) else 0
