"""Fixtures of the server tests: a tiny GPT-2 checkpoint written with transformers (with the real
GPT-2 tokenizer files), the same model in-process, and real `gpt2-engine serve` processes."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import transformers

from gpt2_engine.api import GPT2
from tests.conftest import REPO_ROOT, TOKENIZER_DIR

MODEL_NAME = "tiny-gpt2"
START_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A random GPT-2 with the full vocabulary and context, small enough to serve on two cores.
    A wide initializer keeps its continuations varied (GPT-2's 0.02 repeats one token)."""
    if not (TOKENIZER_DIR / "encoder.json").exists():
        pytest.fail(f"GPT-2 BPE files not found at {TOKENIZER_DIR} (set GPT2_TOKENIZER_DIR)")
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=64, n_layer=2, n_head=2, n_positions=1024,
                                     initializer_range=0.2)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(TOKENIZER_DIR / name, directory)
    return directory


@pytest.fixture(scope="session")
def model(checkpoint):
    """The served model in this process: the reference the server's answers must equal."""
    return GPT2.from_pretrained(checkpoint, device="cpu")


class ServerProcess:
    """`python -m gpt2_engine.cli serve ...` on 127.0.0.1 (by default --port 0: the port is read from the
    line it prints). Its own session, so that stop() can end whatever it started if it hangs."""

    def __init__(self, *args: str, port: int = 0):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt2_engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                                      "--served-model-name", MODEL_NAME, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.url = self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].split()[0]
                httpx.get(f"{url}/health", timeout=30).raise_for_status()
                return url
        raise RuntimeError("the server did not start:\n" + "".join(self.output))

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(checkpoint):
    process = ServerProcess("--model", str(checkpoint), "--max-num-seqs", "64")
    yield process
    process.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(url: str, name: str) -> float:
    """One unlabelled sample of the server's /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(f"{name} not in /metrics")


def half_sent_connection(url: str) -> socket.socket:
    """A connection to the server at url that sent its headers and 17 of the 1,000 body bytes it
    announced, then waits (a slow or stalled client)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b'{"model": "tiny",')
    return sock
