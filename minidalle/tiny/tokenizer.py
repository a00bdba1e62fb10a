"""Build a small CLIP-style BPE tokenizer from a word list.

Real checkpoints ship their tokenizer files; the embedded tiny models need one of their own. This makes the same kind
of tokenizer CLIP uses (byte-level BPE with `</w>` end-of-word markers, `<|startoftext|>` / `<|endoftext|>`), so any
text still tokenizes (down to single bytes) while the words it was built from become single tokens.
"""

from __future__ import annotations

import re
from collections import Counter

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # the byte -> printable-character table used by GPT-2 and CLIP byte-level BPE
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def learn_merges(words: list[str], max_merges: int = 2000) -> list[tuple[str, str]]:
    """Plain BPE merge learning over a word list (each word weighted by its count)."""
    b2u = _bytes_to_unicode()
    counts = Counter(w.lower() for text in words for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))
    corpus: dict[tuple[str, ...], int] = {}
    for word, c in counts.items():
        chars = [b2u[b] for b in word.encode("utf-8")]
        corpus[tuple(chars[:-1] + [chars[-1] + "</w>"])] = c
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: Counter = Counter()
        for sym, c in corpus.items():
            for a, b in zip(sym, sym[1:], strict=False):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties broken by the pair itself: deterministic
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for sym, c in corpus.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        corpus = merged
    return merges


def build_tokenizer(words: list[str], *, model_max_length: int = 77, max_merges: int = 2000) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is the 256 bytes (+ `</w>` forms), the learned merges and the specials."""
    b2u = _bytes_to_unicode()
    chars = list(b2u.values())
    merges = learn_merges(words, max_merges=max_merges)
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[(a, b) for a, b in merges])
    tok.model_max_length = model_max_length
    return tok
