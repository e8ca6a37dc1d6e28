"""Word-level tokenizers of the tiny random checkpoints (no downloads).

A tiny checkpoint's tokenizer knows the words of the stream, of the prompt template
and of its family's prompt format, plus the family's special tokens (image
placeholders, turn markers, tile markers). Words are lower-cased; spaces separate
them; newlines and ``? : , .`` are tokens of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers
from tokenizers import pre_tokenizers as pre
from transformers import PreTrainedTokenizerFast

from fed_asr.models.tiny import split_words


def word_tokenizer(
    specials: Sequence[str],
    words: Sequence[str],
    *,
    pad: str,
    eos: str,
    unk: str,
    bos: str | None = None,
    image: str | None = None,
) -> PreTrainedTokenizerFast:
    """Lower-case word-level tokenizer: ``specials`` first (ids 0..), then ``words``.

    Spaces separate words; newlines and ``? : , .`` are tokens of their own. No
    special token is added on its own (prompts write them).
    """
    vocab = {token: i for i, token in enumerate(specials)}
    for word in sorted(set(words)):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(r"\n"), behavior="isolated"),
            pre.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre.Split(Regex(r"[?:,.]"), behavior="isolated"),
        ]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        bos_token=bos,
        extra_special_tokens={} if image is None else {"image_token": image},
        padding_side="right",
        model_max_length=4096,
    )


def prompt_words(
    vocabulary: Sequence[str], template: str, extra: Sequence[str]
) -> list[str]:
    """Words of the stream, of the prompt template and of the family's format."""
    words = set(extra) | {"?", ":", ",", ".", "caption"}
    for entry in [*vocabulary, template.format(image=" ", question=" ")]:
        words.update(split_words(entry))
    return sorted(words)
