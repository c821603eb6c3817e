"""Tokenizers built locally, with no hub: used by the tiny test pipelines and the pocket models."""

from __future__ import annotations


def word_clip_tokenizer(words, model_max_length: int = 77, specials_first: bool = True):
    """A real byte-level BPE ``CLIPTokenizer`` whose vocabulary is the 256 byte symbols (alone and
    word-final) plus merges that make each of ``words`` a single token, left to right. Any text
    tokenizes (unknown words byte by byte); no input is rejected. ``specials_first=False`` gives the
    start/end tokens the last ids instead of 0 and 1 (as OpenAI's CLIP vocabulary does)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    specials = ("<|startoftext|>", "<|endoftext|>")
    vocab = {t: i for i, t in enumerate(specials)} if specials_first else {}
    alphabet = sorted(ByteLevel.alphabet())
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            if (prefix, piece) not in merges:
                merges.append((prefix, piece))
                vocab.setdefault(prefix + piece, len(vocab))
            prefix = prefix + piece
    for t in specials:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
