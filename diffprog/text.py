"""Text → token ids with the `tokenizers` library: the notes' word pieces.

`load_tokenizer` reads the `tokenizer.json` a user has (e.g. from bert-base-uncased or gpt2);
`train_wordpiece` (BERT's scheme) and `train_bpe` (GPT-2's byte-level BPE) learn a vocabulary
offline from the user's text. Each returns a `tokenizers.Tokenizer`:

    tok = dp.text.train_wordpiece(lines, vocab_size=2000)
    enc = tok.encode(question, paragraph)   # [CLS] question [SEP] paragraph [SEP]
    enc.ids, enc.type_ids, enc.offsets      # token ids, segments, character spans
"""
from __future__ import annotations

import os
from typing import Iterable

from .core import ArgumentError

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens; a trained WordPiece vocabulary gives them ids 0..4 in this order."""


def load_tokenizer(path):
    """The tokenizer stored in `path`: a tokenizer.json file, or a directory holding one."""
    from tokenizers import Tokenizer
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_tokenizer: no tokenizer.json at {path}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception naming neither the file nor the call
        raise ArgumentError(f"load_tokenizer: {path} is not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from e


def _texts(function, texts):
    """An iterable of strings; one string would be read character by character."""
    if isinstance(texts, (str, bytes)):
        raise ArgumentError(f"{function}: texts must be an iterable of strings (e.g. text.splitlines()), got one "
                            f"{type(texts).__name__} of {len(texts)} characters, which would train on single characters")
    return texts


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, lowercase: bool = True, min_frequency: int = 2):
    """A BERT WordPiece tokenizer learned from `texts` (an iterable of strings): BERT's
    normaliser (lowercasing and accent stripping with `lowercase`) and pre-tokeniser, "##"
    continuation pieces, the specials WORDPIECE_SPECIALS, and the post-processor that writes
    `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` (type ids 0 for A, 1 for B)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(WORDPIECE_SPECIALS), show_progress=False)
    tokenizer.train_from_iterator(_texts("train_wordpiece", texts), trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2):
    """A GPT-2 byte-level BPE tokenizer learned from `texts`: every byte is a base token, so any
    text encodes and decodes back exactly; "<|endoftext|>" is the one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_texts("train_bpe", texts), trainer)
    return tokenizer
