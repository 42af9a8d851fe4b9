"""One completion choice as its tokens arrive: UTF-8-safe text deltas, stop strings, OpenAI logprobs.

Text. A byte-level BPE token may end inside a UTF-8 character, so bytes go through an incremental
decoder (as GPT2.stream does); EOS tokens add no text. Stop strings may span tokens: the last
len(longest stop) - 1 characters are held back until the next token shows they do not start a
stop string; once one appears, the text is cut before it and the choice is finished ("stop").
Logprobs follow OpenAI's completions shape: tokens, token_logprobs, top_logprobs (token string ->
logprob) and text_offset (character offset of each token's text in the choice's full text, the
echoed prompt included). As OpenAI documents (and vLLM does), each top_logprobs entry also holds the
chosen token, so it has up to logprobs + 1 entries: `logprobs: 0` gives the chosen token's alone.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field


def token_string(tokenizer, token_id: int) -> str:
    """A token's text for logprobs; bytes that are not whole UTF-8 as OpenAI writes them ("bytes:\\xe2")."""
    raw = tokenizer.decode_single_token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class Logprobs:
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token: str, logprob: float | None, top: dict[str, float] | None, offset: int) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


class Choice:
    """The state of one choice; `push` takes a token and returns the text now safe to send."""

    def __init__(self, tokenizer, *, eos_token_ids, stop: list[str], logprobs: int | None, prefix: str = ""):
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.stop = stop
        self.want_logprobs = logprobs is not None
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = prefix        # the choice's full text so far (echoed prompt included)
        self._sent = 0             # characters of _text already returned by push
        self._prefix_len = len(prefix)   # stop strings are looked for in the generated part only
        self._searched = len(prefix)
        self._holdback = max(map(len, stop), default=1) - 1
        self.logprobs = Logprobs()
        self._logprobs_sent = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_prompt_logprobs(self, token_ids: list[int], logprobs: list[float | None],
                            top_logprobs: list[tuple[tuple[int, float], ...] | None]) -> None:
        """Echo with logprobs: the prompt's tokens come first (the first has no logprob, as in OpenAI)."""
        decoder, offset = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0
        for token_id, logprob, top in zip(token_ids, logprobs, top_logprobs):
            self.logprobs.add(token_string(self.tokenizer, token_id), logprob,
                              None if top is None else self._top_dict(top, token_id, logprob), offset)
            offset += len(decoder.decode(self.tokenizer.decode_single_token_bytes(token_id)))

    def push(self, token_id: int, finish_reason: str | None, logprob=None, top_logprobs=()) -> str:
        """Take one generated token; the text delta now safe to send (maybe empty). Tokens after the
        choice finished (its sibling sequences still running past a stop string) are dropped."""
        if self.finished:
            return ""
        self.num_tokens += 1
        if self.want_logprobs:
            self.logprobs.add(token_string(self.tokenizer, token_id), logprob,
                              self._top_dict(top_logprobs or (), token_id, logprob), len(self._text))
        if token_id not in self.eos:
            self._text += self._decoder.decode(self.tokenizer.decode_single_token_bytes(token_id))
        if finish_reason is not None:
            self._text += self._decoder.decode(b"", final=True)
        cut = self._find_stop()
        if cut is not None:
            self._text, self.finish_reason = self._text[:cut], "stop"
        elif finish_reason is not None:
            self.finish_reason = finish_reason
        return self._release()

    def take_logprobs(self) -> dict | None:
        """The logprobs entries not yet sent (streaming), or None when the request has none."""
        if not self.want_logprobs:
            return None
        start, self._logprobs_sent = self._logprobs_sent, len(self.logprobs.tokens)
        return {name: values[start:] for name, values in self.logprobs.as_dict().items()}

    def _top_dict(self, pairs, chosen: int, logprob: float) -> dict[str, float]:
        """The top-k tokens and the chosen one (when it is not among them)."""
        top = {token_string(self.tokenizer, t): lp for t, lp in pairs}
        top.setdefault(token_string(self.tokenizer, chosen), logprob)
        return top

    def _find_stop(self) -> int | None:
        if not self.stop:
            return None
        # a new match can start at most len(stop) - 1 characters before the newly added text
        start = max(self._searched - self._holdback, self._prefix_len)
        hits = [i for i in (self._text.find(s, start) for s in self.stop) if i >= 0]
        self._searched = len(self._text)
        return min(hits) if hits else None

    def _release(self) -> str:
        end = len(self._text) if self.finished else max(self._sent, len(self._text) - self._holdback)
        delta, self._sent = self._text[self._sent:end], end
        return delta

    @property
    def text(self) -> str:
        return self._text
