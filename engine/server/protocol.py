"""The /v1/completions request: its JSON shape (pydantic), its conversion into token prompts and
SamplingParams, OpenAI's error JSON, and reading a body within its size limit.

Mapping onto the engine (vLLM's conventions):
    temperature 0      -> greedy (do_sample=False); any other temperature samples (do_sample=True)
                          with temperature, top_p and top_k (-1 or 0 = off); OpenAI's default is 1.0
    max_tokens         -> max_new_tokens (default 16; null = up to the model's context)
    seed               -> SamplingParams.seed, per prompt as GPT2.generate derives it for a batch
    stop               -> cut by the server (gpt2_engine.server.choices); EOS always stops unless ignore_eos
    min_tokens, ignore_eos, repetition_penalty, top_k: vLLM's extensions
    max_tokens 0       -> with echo, the prompt is scored only (no generation; OpenAI's and vLLM's way to
                          get prompt logprobs); without echo a 400
Value checks are SamplingParams' and the router's (the rules of generate()); only what OpenAI's API
adds (logprobs <= 5, at most 4 stop strings, the unsupported options) is checked here.

Parsing is strict, as OpenAI's and vLLM's: the body is parsed by pydantic's JSON parser (nesting
deeper than its recursion limit, NaN and Infinity are invalid JSON) with no coercion between types
(`true` is not the integer 1, `1.0` is not a token id, `"yes"` is not a boolean).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from gpt2_engine.sampling import SamplingParams

MAX_LOGPROBS = 5          # OpenAI's completions limit
MAX_STOP_STRINGS = 4
# OpenAI options this server does not implement, with the only value it accepts.
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None,), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}


class APIError(Exception):
    """An error the client sees as OpenAI's {"error": {...}} JSON with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


async def read_body(request, max_body_size: int) -> bytes:
    """A starlette Request's body, or a 413 APIError as soon as it is known to exceed max_body_size
    (by Content-Length, or by what has arrived): a client cannot make the server buffer more."""
    too_large = APIError(413, f"the request body exceeds {max_body_size} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body_size:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_size:
            raise too_large
    return bytes(body)


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's CreateCompletionRequest; unknown fields are refused (never silently ignored)."""
    model_config = _STRICT

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int = 0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    user: str | None = None
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @classmethod
    def parse(cls, body: bytes | str) -> "CompletionRequest":
        """The request from its raw JSON body (a 400 naming the first bad parameter)."""
        try:
            request = cls.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = first["loc"]
            if first["type"] == "json_invalid":
                raise APIError(400, f"the request body is not valid JSON: {first['msg']}") from None
            if not loc:
                raise APIError(400, f"the request body must be a JSON object ({first['msg']})") from None
            # the field, and the option of stream_options (later parts name union members and indices)
            param = ".".join(str(part) for part in loc[:2 if loc[0] == "stream_options" else 1])
            if first["type"] == "extra_forbidden":
                raise APIError(400, f"unsupported parameter {param!r}", param=param) from None
            if param == "prompt":
                raise APIError(400, "prompt must be a string, a list of strings, a list of token ids (integers) "
                                    "or a list of lists of token ids", param=param) from None
            raise APIError(400, f"invalid {param}: {first['msg']}", param=param) from None
        for name, accepted in UNSUPPORTED.items():
            if getattr(request, name) not in accepted:
                raise APIError(400, f"{name}={getattr(request, name)!r} is not supported by gpt2-engine "
                                    f"(only {accepted[-1]!r})", param=name)
        return request

    @property
    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def score_only(self) -> bool:
        """max_tokens 0 with echo: the prompt (and its logprobs) only, nothing generated."""
        return self.max_tokens == 0 and self.echo


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str          # what echo prepends (the decoded ids for a token prompt)


def prompts_of(request: CompletionRequest, tokenizer) -> list[Prompt]:
    """The request's prompts as token lists: a string, strings, token ids, or lists of token ids.
    Token ids are checked against the vocabulary by the router's check, not here."""
    raw = request.prompt
    if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
        raw = [raw]
    if not raw:
        raise APIError(400, "prompt is empty", param="prompt")
    prompts = []
    for item in raw:
        if isinstance(item, str):
            if not item:
                raise APIError(400, "prompt is empty", param="prompt")
            prompts.append(Prompt(tokenizer.encode(item, allowed_special="all"), item))
        else:
            prompts.append(Prompt(list(item), _decode(tokenizer, item)))
    return prompts


def _decode(tokenizer, token_ids: list[int]) -> str:
    try:
        return tokenizer.decode(token_ids)
    except (KeyError, ValueError, OverflowError):   # ids outside the vocabulary: the router's check names them
        return ""


def sampling_params(request: CompletionRequest, prompt: Prompt, n_positions: int, eos_token_id: int) -> SamplingParams:
    """The request's SamplingParams for one prompt before the per-prompt seed (see `for_prompts`)."""
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}", param="logprobs")
    temperature = 1.0 if request.temperature is None else request.temperature
    top_k = request.top_k if request.top_k not in (None, -1) else 0
    max_tokens = request.max_tokens if request.max_tokens is not None else max(1, n_positions - len(prompt.token_ids))
    if request.score_only:     # the prompt only: its one sampled token is dropped; the other values are still checked
        max_tokens = 1
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, min_new_tokens=request.min_tokens, do_sample=temperature != 0,
            temperature=temperature if temperature != 0 else 1.0, top_k=top_k,
            top_p=1.0 if request.top_p is None else request.top_p,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            eos_token_ids=() if request.ignore_eos else (eos_token_id,), seed=request.seed,
            logprobs=request.logprobs, prompt_logprobs=request.logprobs if request.echo else None)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def for_prompts(params: list[SamplingParams]) -> list[SamplingParams]:
    """Per-prompt seeds exactly as GPT2.generate gives them to the rows of a batch."""
    return [p.for_prompt(row) for row, p in enumerate(params)]


# The request's parameters that a message of SamplingParams' or the engine's checks can start with.
_PARAMS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "logprobs", "seed", "n ",
           "prompt")


def bad_request(message: str) -> APIError:
    """A 400 from SamplingParams' or the engine's check, in the API's names and naming its parameter.
    A prompt that with max_tokens exceeds the context, or needs more KV blocks than the pool holds,
    names max_tokens (the one that can be lowered)."""
    message = message.replace("n (num_return_sequences)", "n")
    for engine_name, api_name in (("max_new_tokens", "max_tokens"), ("min_new_tokens", "min_tokens")):
        message = message.replace(engine_name, f"{api_name} ({engine_name})")
    if "max_tokens (max_new_tokens)=" in message or message.startswith("request needs"):
        param = "max_tokens"
    else:
        param = next((name.strip() for name in _PARAMS if message.startswith(name)), None)
    return APIError(400, message, param=param)
