"""gpt2_engine.tokenizer: GPT-2's BPE built offline from encoder.json + vocab.bpe, vocab.json + merges.txt
or tokenizer.json gives transformers' ids on tricky text and round-trips; a tiny BPE checked by hand;
missing and corrupt files raise errors that name the file; with no path and no network, tiktoken's cache or
else the BPE files packaged with gpt2-engine (checked by sha256)."""
import functools
import hashlib
import json
import shutil

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from transformers import GPT2TokenizerFast

from gpt2_engine.tokenizer import (
    ENDOFTEXT, EOS_TOKEN_ID, GPT2_FILES, GPT2_PAT_STR, PACKAGED_DIR, UNICODE_TO_BYTE, load_tokenizer, packaged_tokenizer,
    tokenizer_files_in,
)

TRICKY = [
    "Hello world",
    " leading space",
    "trailing space ",
    "multiple   spaces   inside",
    "   ",
    "",
    "line one\nline two\n\n\nthree",
    "windows\r\nline\r\nends\r\n",
    "tabs\tand\t\tmore tabs\t",
    " \n \t mixed \n\n  whitespace  \n",
    "Café naïve résumé Ångström",
    "中文字符和日本語のテキスト、한국어",
    "עברית ועוד العربية",
    "emoji 😀 👍🏽 🇫🇷 and a family 👨‍👩‍👧‍👦 (ZWJ)",
    "I'm, you're, we've, they'll, he'd, it's, don't",
    "HE'S SHE'LL THEY'RE I'M I'D WE'VE",
    "'s 't 're 've 'm 'll 'd",
    "numbers 123 4567 89.01 1,000,000 -42 3e8",
    "<|endoftext|>",
    "first<|endoftext|>second",
    " <|endoftext|> spaced <|endoftext|>\n",
    "code: def f(x):\n    return x**2  # square\n",
    "URL https://example.com/a?b=c&d=e#frag",
    "\u00a0nbsp and \u200b zero width and \u0301 combining",
]


@functools.cache
def gpt2_encodings(directory):
    hf = GPT2TokenizerFast(vocab=str(directory / "encoder.json"), merges=str(directory / "vocab.bpe"))
    return load_tokenizer(directory), hf


@pytest.fixture
def enc(tokenizer_dir):
    return gpt2_encodings(tokenizer_dir)[0]


@pytest.fixture
def hf(tokenizer_dir):
    return gpt2_encodings(tokenizer_dir)[1]


def test_known_ids(enc):
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" Hello world") == [18435, 995]
    assert enc.encode(ENDOFTEXT, allowed_special="all") == [EOS_TOKEN_ID] == [50256]
    assert enc.eot_token == EOS_TOKEN_ID and enc.n_vocab == 50257


def test_same_ranks_and_regex_as_tiktoken_gpt2(tokenizer_dir, enc):
    ranks = data_gym_to_mergeable_bpe_ranks(str(tokenizer_dir / "vocab.bpe"), str(tokenizer_dir / "encoder.json"))
    assert enc._mergeable_ranks == ranks
    assert GPT2_PAT_STR == r50k_pat_str
    assert enc._special_tokens == {ENDOFTEXT: 50256}


def test_bytes_to_unicode_table():
    assert len(UNICODE_TO_BYTE) == 256 and sorted(UNICODE_TO_BYTE.values()) == list(range(256))
    assert UNICODE_TO_BYTE["Ġ"] == ord(" ") and UNICODE_TO_BYTE["Ċ"] == ord("\n") and UNICODE_TO_BYTE["A"] == ord("A")


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_transformers_and_round_trip(enc, hf, text):
    ids = enc.encode(text, allowed_special="all")
    assert ids == hf.encode(text)
    assert enc.decode(ids) == text
    assert hf.decode(ids) == text


def test_endoftext_literal(enc):
    text = "a<|endoftext|>b"
    assert enc.encode(text, allowed_special="all") == [64, 50256, 65]
    with pytest.raises(ValueError, match="endoftext"):  # tiktoken's default guard against special text
        enc.encode(text)
    assert 50256 not in enc.encode_ordinary(text)
    assert enc.decode(enc.encode_ordinary(text)) == text


def copy_as_hf_files(tokenizer_dir, directory):
    directory.mkdir()
    shutil.copy(tokenizer_dir / "encoder.json", directory / "vocab.json")
    shutil.copy(tokenizer_dir / "vocab.bpe", directory / "merges.txt")
    return directory


def test_vocab_json_and_merges_txt(tokenizer_dir, tmp_path, enc):
    directory = copy_as_hf_files(tokenizer_dir, tmp_path / "hf")
    assert tokenizer_files_in(directory) == [directory / "vocab.json", directory / "merges.txt"]
    other = load_tokenizer(directory)
    assert other._mergeable_ranks == enc._mergeable_ranks
    assert other.encode(TRICKY[13], allowed_special="all") == enc.encode(TRICKY[13], allowed_special="all")
    # a path to one of the files stands for its directory
    assert load_tokenizer(directory / "merges.txt")._mergeable_ranks == enc._mergeable_ranks


@pytest.mark.parametrize("merge_format", ["pairs", "strings"])
def test_tokenizer_json(hf, tmp_path, enc, merge_format):
    hf.save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json only
    assert not (tmp_path / "vocab.json").exists()
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text())
    assert isinstance(data["model"]["merges"][0], list)  # current tokenizers write [left, right] pairs
    if merge_format == "strings":  # older tokenizer.json files hold "left right" strings
        data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
        path.write_text(json.dumps(data))
    assert tokenizer_files_in(tmp_path) == [path]
    other = load_tokenizer(tmp_path)
    assert other._mergeable_ranks == enc._mergeable_ranks
    assert other._special_tokens == {ENDOFTEXT: 50256}
    for text in TRICKY:
        assert other.encode(text, allowed_special="all") == hf.encode(text)


def test_encoder_json_pair_is_preferred(tokenizer_dir, tmp_path):
    # a checkpoint directory with both sets: encoder.json + vocab.bpe come first
    directory = copy_as_hf_files(tokenizer_dir, tmp_path / "both")
    shutil.copy(tokenizer_dir / "encoder.json", directory)
    shutil.copy(tokenizer_dir / "vocab.bpe", directory)
    assert tokenizer_files_in(directory) == [directory / "encoder.json", directory / "vocab.bpe"]
    (directory / "vocab.bpe").write_text("#version: 0.2\nnot a merge line with four words\n")
    with pytest.raises(ValueError, match="vocab.bpe"):
        load_tokenizer(directory)


# --- a tiny BPE, checked by hand ---------------------------------------------------------------------

BYTE_TO_UNICODE = {byte: char for char, byte in UNICODE_TO_BYTE.items()}
# The 256 bytes take ids 0..255 in byte order; merge i (from 0) makes id 256 + i. "Ġ" is the space.
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "c a", "ca t", "Ġ cat"]
TINY_EOT = 256 + len(TINY_MERGES)  # 262


def tiny_vocab():
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    for i, merge in enumerate(TINY_MERGES):
        vocab[merge.replace(" ", "")] = 256 + i
    return vocab | {ENDOFTEXT: TINY_EOT}


def write_tiny(directory, vocab=None, merges=None):
    directory.mkdir(exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab or tiny_vocab()))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges or TINY_MERGES) + "\n")
    return directory


@pytest.mark.parametrize(
    "text, ids",
    [
        ("the", [ord("t"), 257]),  # "h e" merges; "t he" is no merge
        (" the", [258]),  # "Ġ t" (rank 256) first, then "h e", then "Ġt he"
        ("cat", [260]),  # "c a", then "ca t"
        (" cat", [261]),  # "c a", "ca t", then "Ġ cat"
        ("the cat", [ord("t"), 257, 261]),
        (" tea", [256, ord("e"), ord("a")]),
        ("cat<|endoftext|> the", [260, TINY_EOT, 258]),
        ("z\n", [ord("z"), ord("\n")]),
    ],
)
def test_tiny_bpe_by_hand(tmp_path, text, ids):
    directory = write_tiny(tmp_path / "tiny")
    enc = load_tokenizer(directory)
    assert enc.encode(text, allowed_special="all") == ids
    assert enc.decode(ids) == text
    hf = GPT2TokenizerFast(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))
    assert hf.encode(text) == ids


def test_tiny_bpe_ids_out_of_merge_order(tmp_path):
    vocab = tiny_vocab() | {"Ġt": 257, "he": 256}
    with pytest.raises(ValueError, match="merges.txt.*merge order"):
        load_tokenizer(write_tiny(tmp_path / "tiny", vocab=vocab))


def test_tiny_bpe_merge_result_missing_from_vocab(tmp_path):
    vocab = tiny_vocab()
    del vocab["cat"]
    with pytest.raises(ValueError, match=r"merges.txt: merge 5 \(ca t\)"):
        load_tokenizer(write_tiny(tmp_path / "tiny", vocab=vocab))


def test_tiny_bpe_missing_byte(tmp_path):
    vocab = tiny_vocab()
    del vocab[BYTE_TO_UNICODE[ord("q")]]
    with pytest.raises(ValueError, match=f"vocab.json.*missing \\[{ord('q')}\\]"):
        load_tokenizer(write_tiny(tmp_path / "tiny", vocab=vocab))


def test_tiny_bpe_without_endoftext(tmp_path):
    vocab = tiny_vocab()
    del vocab[ENDOFTEXT]
    with pytest.raises(ValueError, match="vocab.json.*<\\|endoftext\\|>"):
        load_tokenizer(write_tiny(tmp_path / "tiny", vocab=vocab))


# --- errors ---------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_tokenizer(tmp_path / "no-such-dir")


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "encoder.json").write_text("{}")  # half a pair is not enough
    assert tokenizer_files_in(tmp_path) == []
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ["encoder.json", "vocab.bpe", "vocab.json", "merges.txt", "tokenizer.json"])


@pytest.mark.parametrize("name, content", [("vocab.json", '{"a": 1,'), ("vocab.json", "[1, 2]"), ("tokenizer.json", "{not json")])
def test_corrupt_json(tokenizer_dir, tmp_path, name, content):
    if name == "vocab.json":
        copy_as_hf_files(tokenizer_dir, tmp_path / "t")
    else:
        (tmp_path / "t").mkdir()
    (tmp_path / "t" / name).write_text(content)
    with pytest.raises(ValueError, match=name):
        load_tokenizer(tmp_path / "t")


def test_tokenizer_json_that_is_not_bpe(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="tokenizer.json.*BPE"):
        load_tokenizer(tmp_path)


def test_bad_merge_line(tokenizer_dir, tmp_path):
    directory = copy_as_hf_files(tokenizer_dir, tmp_path / "t")
    (directory / "merges.txt").write_text("#version: 0.2\nĠ t\nonly-one-token\n")
    with pytest.raises(ValueError, match="merges.txt, line 3"):
        load_tokenizer(directory)


# --- path None: tiktoken's cache, else the BPE files packaged with gpt2-engine -------------------


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """tiktoken with an empty cache directory, no encodings loaded yet, and downloads failing as they
    do offline (tiktoken fetches through tiktoken.load.read_file)."""

    def offline(blobpath):
        raise ConnectionError(f"network unavailable: {blobpath}")

    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    return cache


def seed_tiktoken_cache(cache, tokenizer_dir):
    """tiktoken caches a download under sha1(url) and checks the file's sha256; seed it with the same files."""
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(tokenizer_dir / name, cache / hashlib.sha1((base + name).encode()).hexdigest())


def test_packaged_files_are_gpt2s_byte_for_byte(tokenizer_dir):
    for name, (_, sha256) in GPT2_FILES.items():
        data = (PACKAGED_DIR / name).read_bytes()
        assert data == (tokenizer_dir / name).read_bytes(), name
        assert hashlib.sha256(data).hexdigest() == sha256, name
    assert "MIT" in (PACKAGED_DIR / "LICENSE").read_text(encoding="utf-8")


def test_no_path_offline_without_cache_uses_the_packaged_files(no_network, enc):
    packaged = load_tokenizer()
    assert packaged is packaged_tokenizer()  # built once per process
    assert packaged._mergeable_ranks == enc._mergeable_ranks and packaged._special_tokens == {ENDOFTEXT: EOS_TOKEN_ID}
    assert packaged.encode("Hello world") == [15496, 995]
    assert list(no_network.iterdir()) == []  # nothing was fetched or cached


def test_no_path_uses_tiktoken_cache(no_network, tokenizer_dir, enc):
    seed_tiktoken_cache(no_network, tokenizer_dir)
    cached = load_tokenizer()
    assert cached.name == "gpt2" and cached is tiktoken.get_encoding("gpt2")
    assert cached is not packaged_tokenizer()
    assert cached.encode(TRICKY[13]) == enc.encode(TRICKY[13])
    assert cached._mergeable_ranks == enc._mergeable_ranks


def test_no_path_with_a_damaged_tiktoken_cache_falls_back_to_the_packaged_files(no_network, tokenizer_dir):
    seed_tiktoken_cache(no_network, tokenizer_dir)
    damaged = next(no_network.iterdir())
    damaged.write_bytes(damaged.read_bytes()[:-10])  # tiktoken's hash check fails, its re-download too
    assert load_tokenizer() is packaged_tokenizer()


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """engine/gpt2_bpe copied to a directory the test may damage, the packaged encoding not yet built."""
    import gpt2_engine.tokenizer

    copy = tmp_path / "gpt2_bpe"
    shutil.copytree(PACKAGED_DIR, copy)
    monkeypatch.setattr(gpt2_engine.tokenizer, "PACKAGED_DIR", copy)
    packaged_tokenizer.cache_clear()
    yield copy
    packaged_tokenizer.cache_clear()


def test_damaged_packaged_file_is_an_error_naming_it(no_network, package_copy):
    vocab = package_copy / "vocab.bpe"
    vocab.write_bytes(vocab.read_bytes().replace(b"\nh e\n", b"\nh f\n", 1))
    with pytest.raises(ValueError, match=r"vocab\.bpe is damaged \(sha256 [0-9a-f]{64}, expected 1ce16647"):
        load_tokenizer()
    (package_copy / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.json is missing"):
        load_tokenizer()


def test_text_generation_works_offline_with_no_tokenizer_files(no_network):
    from gpt2_engine import GPT2, GPT2Config

    model = GPT2.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32), device="cpu")
    [text] = model.generate_text(["Hello"], max_new_tokens=3)
    assert len(packaged_tokenizer().encode(text, allowed_special="all")) >= 1
    assert model.tokenizer is packaged_tokenizer()
