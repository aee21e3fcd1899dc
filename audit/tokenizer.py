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


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77):
    """Build a ``transformers.CLIPTokenizer`` with CLIP's conventions whose vocabulary holds ``words``.

    The vocabulary is: BOS ``<|startoftext|>``, EOS ``<|endoftext|>`` (also the padding and unknown token,
    as in SD v1's tokenizer), the 256 byte symbols with and without the ``</w>`` end-of-word suffix, and
    the merges a byte-pair-encoding trainer (``tokenizers.trainers.BpeTrainer``) learns from ``words``
    until each word is one token. Learned merges are consistent by construction: applying them in
    order segments every listed word into itself.

    Args:
        words: words to make single tokens (lower-cased, as CLIP lower-cases text); duplicates ignored.
        model_max_length: padded sequence length L (77 in SD v1).

    Returns:
        A ``CLIPTokenizer`` (call ``save_pretrained`` to write it in diffusers layout).
    """
    import json

    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    base: dict[str, int] = {BOS: 0, EOS: 1}
    for ch in _byte_alphabet():
        base.setdefault(ch, len(base))
    for ch in _byte_alphabet():
        base.setdefault(ch + "</w>", len(base))
    template = CLIPTokenizer(vocab=dict(base), merges=[], model_max_length=model_max_length)
    bpe = Tokenizer(models.BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = template.backend_tokenizer.normalizer
    bpe.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    words = [w for w in dict.fromkeys(w.strip().lower() for w in words) if w and not any(c.isspace() for c in w)]
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, show_progress=False,
                                  special_tokens=[BOS, EOS], initial_alphabet=list(_byte_alphabet()),
                                  end_of_word_suffix="</w>", continuing_subword_prefix="")
    bpe.train_from_iterator(words, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    vocab = dict(base)
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
