"""One hostile client beside 32 normal streams (issue 22): a request with more prompts than the
server takes, a request of 64 long prompts with echo + logprobs abandoned while they are scored, a
10 MB body, a half-sent body held open, and 16 /metrics scrapers. Every normal stream must equal its
solo run, and SIGTERM must still drain and exit 0 with the half-sent body open.

The same 32 streams run first alone, then beside the hostile client, on one server; the inter-token
p99 of both runs is printed (`pytest -s`), not asserted: it is a measurement of this machine."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from tests.conftest import require_modules

require_modules("fastapi", "uvicorn", "pydantic")

from tests.server.conftest import MODEL_NAME, ServerProcess, half_sent_connection  # noqa: E402

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello, my name is", "In 1492,", "def main():"]
NUM_STREAMS, MAX_TOKENS, NUM_SCRAPERS = 32, 48, 16


async def _normal_stream(http: httpx.AsyncClient, url: str, i: int) -> tuple[str, list[float]]:
    """One streaming request: its text and the gaps between its chunks."""
    body = {"model": MODEL_NAME, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 1.0,
            "seed": 1000 + i, "stream": True}
    text, arrivals = [], []
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.perf_counter())
                text.append(json.loads(line[len("data: "):])["choices"][0]["text"])
    return "".join(text), list(np.diff(arrivals))


async def _normal_run(url: str) -> list[tuple[str, list[float]]]:
    limits = httpx.Limits(max_connections=NUM_STREAMS + NUM_SCRAPERS + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        return await asyncio.gather(*(_normal_stream(http, url, i) for i in range(NUM_STREAMS)))


async def _hostile(url: str, done: threading.Event, model) -> dict:
    """The hostile client's requests, until `done`; the statuses it got."""
    statuses = {}
    async with httpx.AsyncClient(timeout=300) as http:
        async def scrape():
            count = 0
            while not done.is_set():
                (await http.get(f"{url}/metrics")).raise_for_status()
                count += 1
            return count

        scrapers = [asyncio.ensure_future(scrape()) for _ in range(NUM_SCRAPERS)]
        huge = {"model": MODEL_NAME, "prompt": ["hello world"] * 4000, "max_tokens": 50, "ignore_eos": True}
        statuses["4000 prompts"] = (await http.post(f"{url}/v1/completions", json=huge)).status_code
        long = model.tokenizer.encode(" ".join(["alpha beta"] * 300))[:500]
        abandoned = {"model": MODEL_NAME, "prompt": [long[i:] for i in range(64)], "max_tokens": 50,
                     "ignore_eos": True, "echo": True, "logprobs": 5}
        try:
            await http.post(f"{url}/v1/completions", json=abandoned, timeout=httpx.Timeout(300, read=1.0))
            statuses["abandoned"] = "answered"
        except httpx.ReadTimeout:
            statuses["abandoned"] = "left"
        big = b'{"model": "%s", "prompt": "%s"}' % (MODEL_NAME.encode(), b"y" * (10 * 1024 * 1024))
        statuses["10 MB"] = (await http.post(f"{url}/v1/completions", content=big,
                                             headers={"content-type": "application/json"})).status_code
        statuses["scrapes"] = sum(await asyncio.gather(*scrapers))
    return statuses



def _p99_ms(runs) -> float:
    return float(np.percentile([gap for _, gaps in runs for gap in gaps], 99) * 1e3)


def test_normal_streams_beside_a_hostile_client_equal_their_solo_runs(checkpoint, model):
    solo = [model.generate_text(PROMPTS[i % len(PROMPTS)], max_new_tokens=MAX_TOKENS, do_sample=True, temperature=1.0,
                                top_k=0, seed=1000 + i)[0] for i in range(NUM_STREAMS)]
    process = ServerProcess("--model", str(checkpoint), "--max-num-seqs", "64", "--shutdown-timeout", "5")
    try:
        alone = asyncio.run(asyncio.wait_for(_normal_run(process.url), 600))

        # the hostile client runs on its own event loop (a thread), so that its 16 scrapers do not
        # delay the normal client's reading of its streams
        done = threading.Event()
        hostile = ThreadPoolExecutor(1).submit(asyncio.run, _hostile(process.url, done, model))
        half = half_sent_connection(process.url)
        try:
            attacked = asyncio.run(asyncio.wait_for(_normal_run(process.url), 600))
        finally:
            done.set()
        statuses = hostile.result(timeout=600)
        for run in (alone, attacked):
            for i, (text, _) in enumerate(run):
                assert text == solo[i], f"stream {i}"
        assert statuses["4000 prompts"] == 400 and statuses["10 MB"] == 413 and statuses["scrapes"] > 0
        print(f"\ninter-token p99 of {NUM_STREAMS} streams x {MAX_TOKENS} tokens: alone {_p99_ms(alone):.1f} ms, "
              f"beside the hostile client {_p99_ms(attacked):.1f} ms ({statuses})")
        process.proc.send_signal(signal.SIGTERM)        # the half-sent body is still open
        assert process.proc.wait(timeout=120) == 0
        half.close()
    finally:
        process.stop()
