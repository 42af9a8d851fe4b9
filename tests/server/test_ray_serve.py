"""`gpt2-engine serve --replicas 2`: a local Ray instance with a Ray Serve deployment of two engines
on the CPU, started and stopped by the test (one test: Ray starts slowly on two cores)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from tests.conftest import require_modules

require_modules("openai", "fastapi", "uvicorn", "pydantic", "ray")

import openai  # noqa: E402

from tests.server.conftest import MODEL_NAME, ServerProcess, free_port

pytest.importorskip("ray.serve", reason="Ray Serve is the optional `ray` extra")

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello, my name is", "In 1492,"]


def test_two_replicas_share_the_load_and_answer_as_in_process(checkpoint, model):
    process = ServerProcess("--model", str(checkpoint), "--replicas", "2", "--max-num-seqs", "16", "--shutdown-timeout", "1",
                            port=free_port())
    try:
        async def one(http, i):
            body = {"model": MODEL_NAME, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "temperature": 1.0,
                    "seed": i}
            response = await http.post(f"{process.url}/v1/completions", json=body)
            response.raise_for_status()
            return response.headers["x-gpt2-engine-replica"], response.json()["choices"][0]["text"]

        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(one(http, i) for i in range(16)))

        answers = asyncio.run(asyncio.wait_for(burst(), 240))
        assert len({replica for replica, _ in answers}) == 2
        for i, (_, text) in enumerate(answers):
            assert text == model.generate_text(PROMPTS[i % len(PROMPTS)], max_new_tokens=24, do_sample=True,
                                               top_k=0, seed=i)[0], f"request {i}"
        with openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", timeout=120, max_retries=0) as client:
            stream = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True)
            assert "".join(chunk.choices[0].text for chunk in stream) == model.generate_text(PROMPTS[0], max_new_tokens=8)[0]
        long = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120) as http:
            # a client that leaves mid-stream: the ingress's cancel reaches the replica, which ends the
            # request (it does not generate the 900 tokens asked for)
            generated = _replica_health(http, process.url)
            with http.stream("POST", f"{process.url}/v1/completions", json=long) as stream:
                replica = stream.headers["x-gpt2-engine-replica"]
                assert next(line for line in stream.iter_lines() if line.startswith("data: "))
            health = _replica_health(http, process.url, replica, until_idle=True)[replica]
            assert health["num_requests"] == 0
            assert health["tokens_generated"] - generated[replica]["tokens_generated"] < 900
            # a replica killed mid-stream: the stream ends with an SSE error event, not a cut connection,
            # and the next request is answered
            with http.stream("POST", f"{process.url}/v1/completions", json=long) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                os.kill(int(stream.headers["x-gpt2-engine-replica"].rsplit(":", 1)[1]), signal.SIGKILL)
                events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
            assert json.loads(events[-1])["error"]["code"] == "replica_failed", events[-3:]
            response = http.post(f"{process.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
            assert response.status_code == 200, response.text
        # drain: new requests get a 503 in OpenAI's shape (not Ray's 404), a running stream past
        # --shutdown-timeout ends with an SSE error event, and the command exits 0
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{process.url}/v1/completions", json=long) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            process.proc.send_signal(signal.SIGTERM)
            statuses = []
            for _ in range(50):        # until the replicas have seen the drain (they poll for it)
                response = http.post(f"{process.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "hi",
                                                                             "max_tokens": 1})
                statuses.append(response.status_code)
                if response.status_code != 200:
                    break
            assert statuses[-1] == 503 and response.json()["error"]["type"] == "service_unavailable", statuses
            events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
            assert json.loads(events[-1])["error"]["type"] == "service_unavailable"
        assert process.proc.wait(timeout=120) == 0
    finally:
        process.stop()



def _replica_health(http: httpx.Client, url: str, replica: str | None = None, until_idle: bool = False) -> dict:
    """/health of each replica (Serve picks which answers): of both, or, until_idle, of `replica` once
    it has no request left (at most 20 s of asking)."""
    deadline, answers = time.monotonic() + 20, {}
    while time.monotonic() < deadline:
        health = http.get(f"{url}/health").json()
        answers[health["replica"]] = health
        if (answers[replica]["num_requests"] == 0 if until_idle and replica in answers else
                not until_idle and len(answers) == 2):
            break
        time.sleep(0.05)
    return answers
