"""A CLIP-convention tokenizer built offline from a word list.

Stable Diffusion v1 uses OpenAI's CLIP BPE tokenizer: byte-level BPE, words end in ``</w>``,
``<|startoftext|>`` (BOS) first, ``<|endoftext|>`` (EOS) after the prompt, and the same EOS token as
padding up to ``model_max_length`` = 77. Its 49,408-entry vocabulary cannot be downloaded here, so the
tests and the lab build a small vocabulary with exactly those conventions: every byte (so any text,
emoji and non-Latin scripts included, tokenizes with no unknown token), plus merges that make each
word of a given list a single token (learned deterministically: :func:`learn_merges`).
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


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair-encoding merges that make every word of ``words`` a single token, deterministically.

    Classic BPE training (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
    Units", Algorithm 1): each word starts as its byte symbols (:func:`_byte_alphabet`) with ``</w>``
    appended to the last one; repeatedly the most frequent adjacent pair over all words (each word counted
    once) is merged everywhere, until every word is one symbol. Ties are broken by the pair itself in
    lexicographic order, so the result is a pure function of the word SET (insertion order and Python's
    hash seed do not matter). ``tokenizers.trainers.BpeTrainer``, used before, broke ties by hash order:
    four processes gave four vocabularies (issue 11).

    Returns:
        merges in rank order, each a pair of symbols.
    """
    table = _byte_alphabet()
    segs = []
    for w in sorted(set(words)):
        sym = [table[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        segs.append(sym)
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for sym in segs:
            for a, b in zip(sym, sym[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            return merges
        top = max(counts.values())
        pair = min(p for p, c in counts.items() if c == top)
        merges.append(pair)
        joined = pair[0] + pair[1]
        for k, sym in enumerate(segs):
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == pair:
                    out.append(joined)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            segs[k] = out


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77):
    """Build a ``transformers.CLIPTokenizer`` with CLIP's conventions whose vocabulary holds ``words``.

    The vocabulary is: BOS ``<|startoftext|>`` (id 0), EOS ``<|endoftext|>`` (id 1; also the padding and
    unknown token, as in SD v1's tokenizer), the 256 byte symbols, the same with the ``</w>`` end-of-word
    suffix, then one entry per merge of :func:`learn_merges` in merge order. Deterministic: the same word
    set gives the same ids in every process (tested by building it in two subprocesses).

    Args:
        words: words to make single tokens (lower-cased, as CLIP lower-cases text); duplicates and words
            containing whitespace ignored.
        model_max_length: padded sequence length L (77 in SD v1).

    Returns:
        A ``CLIPTokenizer`` (call ``save_pretrained`` to write it in diffusers layout; load that saved copy
        rather than rebuilding when a model was trained with it).
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
    for ch in _byte_alphabet():
        vocab.setdefault(ch + "</w>", len(vocab))
    words = [w for w in dict.fromkeys(w.strip().lower() for w in words) if w and not any(c.isspace() for c in w)]
    merges = learn_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
