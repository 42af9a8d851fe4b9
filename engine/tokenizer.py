"""GPT-2's byte-level BPE tokenizer as a tiktoken Encoding, built offline from the files that ship
with GPT-2 checkpoints, or, when no path is given, tiktoken's own `gpt2` encoding if tiktoken's cache
holds its files, else the copy of those files packaged with gpt2-engine (engine/gpt2_bpe, sha256
checked at load). No path never downloads anything.

Files looked for in a directory (a checkpoint or a tokenizer directory), in this order:
  encoder.json + vocab.bpe   OpenAI's release of GPT-2 ("data gym" format)
  vocab.json + merges.txt    Hugging Face's names for the same two files
  tokenizer.json             Hugging Face tokenizers' single file: model.vocab + model.merges
Format: the vocab maps token -> id, a token being its bytes written one character per byte through
GPT-2's bytes_to_unicode table (so that every byte is a printable character: the space 0x20 is "Ġ",
the newline 0x0A is "Ċ"); the merges are "left right" pairs in priority order, and merges.txt /
vocab.bpe start with a "#version: 0.2" header line. tiktoken ranks a token by its id, so the loader
checks that ids follow merge order (GPT-2: the 256 bytes are ids 0..255, merge i makes id 256 + i).

Prompts: tiktoken's `enc.encode(text)` raises a ValueError on text that contains `<|endoftext|>`.
The engine encodes prompt text with `enc.encode(text, allowed_special="all")`, which turns the literal
into EOS_TOKEN_ID exactly as transformers' GPT2TokenizerFast does; `enc.encode_ordinary(text)` keeps
it as plain text.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import tiktoken

ENDOFTEXT = "<|endoftext|>"
EOS_TOKEN_ID = 50256

# GPT-2's pre-tokenization regex, as tiktoken's gpt2 encoding writes it (tiktoken_ext.openai_public):
# contractions, letters, numbers and other symbols each with an optional leading space, then whitespace.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

FILE_SETS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"), ("tokenizer.json",))

# OpenAI's GPT-2 files as tiktoken fetches them (tiktoken_ext.openai_public.gpt2) and as gpt2-engine
# packages them: name -> (url, sha256). tiktoken checks the same hashes.
GPT2_FILES = {
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
PACKAGED_DIR = Path(__file__).resolve().parent / "gpt2_bpe"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes map to themselves, the other 68 bytes
    (controls, space, 0x7F-0xA0, 0xAD) to the characters 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def load_tokenizer(path: str | Path | None = None) -> tiktoken.Encoding:
    """GPT-2's BPE from the tokenizer files in `path` (a directory, or a file inside one); with no path,
    tiktoken's `gpt2` encoding when tiktoken's cache holds it, else the BPE files packaged with gpt2-engine
    (the same files, so the same encoding; never a download)."""
    if path is None:
        return _tiktoken_cached_gpt2() or packaged_tokenizer()
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    files = tokenizer_files_in(directory)
    if not files:
        wanted = ", ".join(" + ".join(names) for names in FILE_SETS)
        raise FileNotFoundError(f"no GPT-2 tokenizer files in {directory}: looked for {wanted}")
    return _load_files(files)


@functools.cache
def packaged_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE from the encoder.json + vocab.bpe packaged with gpt2-engine, after checking their sha256
    (built once per process; a tiktoken Encoding is immutable)."""
    for name, (_, expected) in GPT2_FILES.items():
        path = PACKAGED_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 BPE file {path} is missing from the gpt2-engine installation; reinstall it")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"GPT-2 BPE file {path} is damaged (sha256 {digest}, expected {expected}); reinstall gpt2-engine")
    return _load_files([PACKAGED_DIR / name for name in FILE_SETS[0]])


def _load_files(files: list[Path]) -> tiktoken.Encoding:
    if len(files) == 2:
        vocab, merges, specials = _read_json_object(files[0]), _read_merges(files[1]), {}
        return _encoding(vocab, merges, specials, source=f"{files[0]} + {files[1]}")
    return _encoding(*_read_tokenizer_json(files[0]), source=str(files[0]))


def tokenizer_files_in(path: str | Path) -> list[Path]:
    """The first complete set of tokenizer files (FILE_SETS order) in a directory, or [] if there is none."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    for names in FILE_SETS:
        files = [directory / name for name in names]
        if all(f.is_file() for f in files):
            return files
    return []


def _tiktoken_cached_gpt2() -> tiktoken.Encoding | None:
    """tiktoken's `gpt2` encoding if tiktoken's download cache holds both of its files, else None.
    tiktoken.load.read_file_cached keeps a download at <cache>/sha1(url), <cache> being TIKTOKEN_CACHE_DIR,
    else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache ("" turns caching off)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    if not cache or not all(os.path.isfile(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
                            for url, _ in GPT2_FILES.values()):
        return None
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError):  # a cached file with a bad hash makes tiktoken re-download, which fails offline
        return None


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"tokenizer file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"merges file {path} is not UTF-8 text: {exc}") from exc
    merges = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"merges file {path}, line {number}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict, list[tuple[str, str]], dict[str, int]]:
    data = _read_json_object(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"tokenizer file {path} has no BPE model (model.type 'BPE' with model.vocab)")
    merges = []
    for merge in model.get("merges", []):  # "left right" strings (older files) or [left, right] pairs
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2:
            raise ValueError(f"tokenizer file {path}: bad merge {merge!r}")
        merges.append((parts[0], parts[1]))
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    return model["vocab"], merges, specials


def _encoding(vocab: dict, merges: list[tuple[str, str]], specials: dict[str, int], source: str) -> tiktoken.Encoding:
    """A tiktoken Encoding from an HF-style vocab (unicode-mapped token -> id) and merge list."""
    if ENDOFTEXT in vocab:
        specials = {**specials, ENDOFTEXT: vocab[ENDOFTEXT]}
    if ENDOFTEXT not in specials:
        raise ValueError(f"{source}: the vocabulary has no {ENDOFTEXT} token")
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        if token in specials:
            continue
        if not isinstance(token, str) or not isinstance(rank, int) or any(c not in UNICODE_TO_BYTE for c in token):
            raise ValueError(f"{source}: vocabulary entry {token!r}: {rank!r} is not a byte-level BPE token and id")
        ranks[bytes(UNICODE_TO_BYTE[c] for c in token)] = rank
    if len(set(ranks.values()) | set(specials.values())) != len(ranks) + len(specials):
        raise ValueError(f"{source}: two vocabulary entries share an id")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise ValueError(f"{source}: a byte-level BPE needs a token for each of the 256 bytes; missing {missing_bytes}")
    # tiktoken merges the adjacent pair whose concatenation has the lowest id where the BPE merges the pair
    # listed first; tiktoken can only follow the merge list when merge i makes the i-th smallest
    # multi-byte id and every multi-byte token comes from a merge (true of GPT-2's files).
    merged_ids = []
    for number, (left, right) in enumerate(merges, 1):
        if left + right not in vocab:
            raise ValueError(f"{source}: merge {number} ({left} {right}) makes a token missing from the vocabulary")
        merged_ids.append(vocab[left + right])
    if merged_ids != sorted(rank for token, rank in ranks.items() if len(token) > 1):
        raise ValueError(
            f"{source}: token ids do not follow merge order (tiktoken needs merge i to make the i-th "
            f"multi-byte id, and every multi-byte token to come from a merge)"
        )
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
