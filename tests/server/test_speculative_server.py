"""`gpt2-engine serve --speculative-model int8` (vLLM's flags): completions, streams and stop strings
equal the plain model's greedy answers."""
from __future__ import annotations

import httpx
import pytest

from tests.conftest import require_modules

require_modules("fastapi", "uvicorn", "pydantic")

from tests.server.conftest import MODEL_NAME, ServerProcess  # noqa: E402
from tests.server.test_server import PROMPTS, generated_ids  # noqa: E402


@pytest.fixture(scope="module")
def speculative_server(checkpoint):
    process = ServerProcess("--model", str(checkpoint), "--speculative-model", "int8", "--num-speculative-tokens", "3")
    yield process
    process.stop()


def test_speculative_server_answers_as_plain_greedy(speculative_server, model):
    with httpx.Client(base_url=speculative_server.url, timeout=60) as http:
        for prompt in PROMPTS[:3]:
            tokens = generated_ids(model, prompt, 20)
            full = model.tokenizer.decode(tokens)
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 20, "temperature": 0}
            assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == full
            # a stop string inside the continuation: cut before it, even when it ends inside an accepted run
            stop = full[len(full) // 2:len(full) // 2 + 3]
            with http.stream("POST", "/v1/completions", json=body | {"stream": True, "stop": [stop]}) as response:
                lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: {")]
            text = "".join(httpx.Response(200, content=line).json()["choices"][0]["text"] for line in lines)
            assert text == full[:full.index(stop)]
        assert http.get("/health").json()["spec_draft_tokens"] > 0
