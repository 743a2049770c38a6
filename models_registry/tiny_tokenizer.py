"""A real byte-level BPE tokenizer, trained here in plain Python and written as Hugging Face's
``tokenizer.json`` (the format ``tokenizers`` writes and ``transformers`` loads), for the tiny
models the real engine serves in the demo and the tests::

    tokenizer = train_bpe(CORPUS, merges=240)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer)))

Byte-level like GPT-2's: every byte has a token (so any text encodes, nothing is unknown), each
byte shown as a printable character (space is ``Ġ``), and merges learned from the corpus by the
textbook algorithm: count adjacent pairs inside words, merge the most frequent, repeat.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

# Pre-tokenization for training only (the engine splits with GPT-2's pattern): a word with its
# leading space, a run of punctuation with its leading space, or whitespace.
WORDS = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")

CORPUS = """\
Berth deploys language models on a team's own servers. A member registers a model directory,
the planner works out the memory, the launcher starts the engine in a container, and the
console watches it load. When the engine is ready, the model answers requests: a prompt goes
in, tokens come out, one at a time. This model is tiny and its weights are random, so the text
it writes means nothing, but every step on the way is real: the tokenizer splits the prompt
into tokens, the engine runs the layers, samples the next token and streams it back.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? 0123456789
user assistant system: what is the answer? The answer is forty-two. Thank you, goodbye.
"""


@dataclass(frozen=True)
class ByteLevelBPE:
    """A trained tokenizer: token -> id (bytes first, then merges in order), and the merges."""

    vocab: dict[str, int]
    merges: tuple[tuple[str, str], ...]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (``bytes_to_unicode``): printable
    Latin-1 bytes stand for themselves, the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def train_bpe(corpus: str, merges: int) -> ByteLevelBPE:
    """Learn up to ``merges`` merges from ``corpus``; deterministic (ties broken by the pair)."""
    alphabet = byte_alphabet()
    vocab = {alphabet[byte]: byte for byte in range(256)}
    words = Counter(tuple(alphabet[b] for b in word.encode()) for word in WORDS.findall(corpus))
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        learned.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return ByteLevelBPE(vocab=vocab, merges=tuple(learned))


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return tuple(merged)


def encode(tokenizer: ByteLevelBPE, text: str) -> list[int]:
    """Token ids of ``text`` by applying the merges in rank order (what the engine does)."""
    alphabet = byte_alphabet()
    rank = {pair: number for number, pair in enumerate(tokenizer.merges)}
    ids: list[int] = []
    for word in WORDS.findall(text):
        symbols = tuple(alphabet[b] for b in word.encode())
        while len(symbols) > 1:
            pairs = [p for p in itertools.pairwise(symbols) if p in rank]
            if not pairs:
                break
            symbols = _merge(symbols, min(pairs, key=rank.__getitem__))
        ids += [tokenizer.vocab[symbol] for symbol in symbols]
    return ids


def tokenizer_json(tokenizer: ByteLevelBPE, special_tokens: list[str]) -> dict:
    """``tokenizer.json`` with the special tokens appended after the learned vocabulary."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    first_special = len(tokenizer.vocab)
    added = [
        {
            "id": first_special + number,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for number, token in enumerate(special_tokens)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": tokenizer.vocab | {t["content"]: t["id"] for t in added},
            "merges": [f"{left} {right}" for left, right in tokenizer.merges],
        },
    }
