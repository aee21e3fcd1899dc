"""A CLIP-convention tokenizer built offline from a word list.

Stable Diffusion v1 uses OpenAI's CLIP BPE tokenizer: byte-level BPE, words end in ``</w>``,
``<|startoftext|>`` (BOS) first, ``<|endoftext|>`` (EOS) after the prompt, and the same EOS token as
padding up to ``model_max_length`` = 77. Its 49,408-entry vocabulary cannot be downloaded here, so the
tests and the lab build a small vocabulary with exactly those conventions: every byte (so any text,
emoji and non-Latin scripts included, tokenizes with no unknown token), plus merges that make each
word of a given list a single token.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE (``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return tuple(chr(table[b]) for b in range(256))


def _word_symbols(word: str) -> list[str]:
    alphabet = _byte_alphabet()
    chars = [alphabet[b] for b in word.encode("utf-8")]
    chars[-1] = chars[-1] + "</w>"
    return chars


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77):
    """Build a ``transformers.CLIPTokenizer`` with CLIP's conventions whose vocabulary holds ``words``.

    The vocabulary is: BOS ``<|startoftext|>``, EOS ``<|endoftext|>`` (also the padding and unknown token,
    as in SD v1's tokenizer), the 256 byte symbols with and without the ``</w>`` end-of-word suffix, and
    for each word (lower-cased, as CLIP lower-cases text) the left-to-right merges that make it one token.

    Args:
        words: words to make single tokens; duplicates and empty strings are ignored.
        model_max_length: padded sequence length L (77 in SD v1).

    Returns:
        A ``CLIPTokenizer`` (call ``save_pretrained`` to write it in diffusers layout).
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    add(BOS)
    add(EOS)
    for ch in _byte_alphabet():
        add(ch)
    for ch in _byte_alphabet():
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    for word in dict.fromkeys(w.strip().lower() for w in words):
        if not word or any(c.isspace() for c in word):
            continue
        symbols = _word_symbols(word)
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = (current, nxt)
            current = current + nxt
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            add(current)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
