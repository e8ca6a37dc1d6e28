"""The built-in tiny LLaVA: a real ``LlavaForConditionalGeneration`` built from config.

CLIP vision tower + two-layer projector + Llama decoder, a word-level tokenizer over the
stream's vocabulary and a PIL-backed CLIP image processor, tied together by a
``LlavaProcessor``. Everything is built locally; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from fed_asr.config import ModelConfig

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE)
# Always in the vocabulary, so prompts and questions tokenize without `<unk>`.
PUNCTUATION: tuple[str, ...] = ("?", ":", ",", ".")
CAPTION_QUESTION = "caption"
# Room for the question and answer after the image tokens (RoPE has no position table;
# this only bounds the config's `max_position_embeddings`).
TEXT_POSITIONS = 512


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Whitespace split, then `?`, `:`, `,`, `.` as separate tokens (as in data)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[?:,.]"), behavior="isolated"),
        ]
    )


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it exactly as the tiny tokenizer does."""
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text.lower())]


def tiny_tokens(vocabulary: Sequence[str], prompt_template: str) -> list[str]:
    """Word tokens of the tiny tokenizer (specials excluded), sorted.

    Parameters
    ----------
    vocabulary : Sequence[str]
        Words (or phrases) of the stream; each is lower-cased and split like text.
    prompt_template : str
        The prompt; its words (e.g. ``answer``, ``:``) are added.

    Returns
    -------
    list[str]
        Sorted unique tokens, including punctuation and ``caption``.
    """
    tokens = set(PUNCTUATION) | {CAPTION_QUESTION}
    for entry in vocabulary:
        tokens.update(split_words(entry))
    tokens.update(split_words(prompt_template.format(image=" ", question=" ")))
    tokens.difference_update(SPECIAL_TOKENS)
    return sorted(tokens)


def build_tokenizer(tokens: Sequence[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials first (``<pad>`` = 0), then ``tokens``.

    Parameters
    ----------
    tokens : Sequence[str]
        Lower-case word tokens (see ``tiny_tokens``).

    Returns
    -------
    PreTrainedTokenizerFast
        Adds ``<s>`` in front of every text; ``<image>`` is an atomic special token.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",
        model_max_length=TEXT_POSITIONS + 4096,
    )


def build_processor(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast
) -> LlavaProcessor:
    """``LlavaProcessor`` expanding ``<image>`` to (image_size / patch_size)^2 tokens.

    Parameters
    ----------
    cfg : ModelConfig
        ``image_size`` and ``patch_size`` are used.
    tokenizer : PreTrainedTokenizerFast
        From ``build_tokenizer``.

    Returns
    -------
    LlavaProcessor
        With the PIL CLIP image processor (resize + centre crop to ``image_size``), so
        torchvision is not needed.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        image_token=IMAGE,
    )


def tiny_config(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerFast,
    num_key_value_heads: int | None = None,
) -> LlavaConfig:
    """``LlavaConfig`` of the tiny model (CLIP vision + Llama text).

    Parameters
    ----------
    cfg : ModelConfig
        Architecture fields (``vision_*``, ``text_*``, ``image_size``, ``patch_size``).
    tokenizer : PreTrainedTokenizerFast
        Gives the vocabulary size and special token ids.
    num_key_value_heads : int | None
        Grouped-query attention in the text model; ``cfg.text_heads`` when None.

    Returns
    -------
    LlavaConfig
        Ready for ``LlavaForConditionalGeneration(config)``.

    Raises
    ------
    ValueError
        Head counts that do not divide the hidden sizes.
    """
    kv_heads = cfg.text_heads if num_key_value_heads is None else num_key_value_heads
    for name, hidden, heads in (
        ("model.vision_hidden_size", cfg.vision_hidden_size, cfg.vision_heads),
        ("model.text_hidden_size", cfg.text_hidden_size, cfg.text_heads),
    ):
        if hidden % heads:
            raise ValueError(
                f"`{name}` ({hidden}) must be a multiple of its heads ({heads})."
            )
    if cfg.text_heads % kv_heads:
        raise ValueError(
            f"`num_key_value_heads` ({kv_heads}) must divide `model.text_heads` "
            f"({cfg.text_heads})."
        )
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=4 * cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=num_patches + TEXT_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=num_patches,
        tie_word_embeddings=False,
    )


def build_tiny(
    cfg: ModelConfig,
    vocabulary: Sequence[str],
    seed: int = 0,
    num_key_value_heads: int | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build an untrained tiny LLaVA and its processor.

    Parameters
    ----------
    cfg : ModelConfig
        Architecture and prompt template.
    vocabulary : Sequence[str]
        Words of the stream (``ContinualStream.vocabulary()``).
    seed : int
        Seeds the weight initialisation (the global RNG is left untouched).
    num_key_value_heads : int | None
        Grouped-query attention heads of the text model (default: none).

    Returns
    -------
    tuple[LlavaForConditionalGeneration, LlavaProcessor]
        A float32 model on CPU in eval mode, and the processor.
    """
    tokenizer = build_tokenizer(tiny_tokens(vocabulary, cfg.prompt_template))
    processor = build_processor(cfg, tokenizer)
    config = tiny_config(cfg, tokenizer, num_key_value_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.eval(), processor
