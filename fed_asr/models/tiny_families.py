"""Tiny random checkpoints of the non-LLaVA families, built locally (no downloads).

Each is the family's own transformers model class built from its own config class
(SigLIP + Gemma / Gemma 2 for PaliGemma 1 / 2; the Qwen2-VL and Qwen2.5-VL ViTs and
decoders; Idefics3 and LLaVA-OneVision from ``fed_asr.models.tiny_tiled``), with
hidden sizes of 16-32 and 1-2 layers, a word-level tokenizer that carries the family's
special tokens, the family's processor (PIL image processors, so torchvision is not
needed) and, for chat families, a chat template in the family's turn format.
``save_tiny_checkpoint`` writes one with ``save_pretrained``, so it loads like a real
checkpoint: ``model=pretrained model.path=<dir>``. The weights are random: these
checkpoints test the plumbing, not the model.

Command line: ``python -m fed_asr.models.tiny_families <kind> <dir> [words...]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fed_asr.models.processors import image_only_processor_class
from fed_asr.models.tiny_tiled import build_idefics3, build_llava_onevision
from fed_asr.models.tiny_tokenizer import prompt_words, word_tokenizer

IMAGE_SIZE = 16  # PaliGemma: 4x4 patches of 4 px
# Qwen2-VL: images are resized to 16x16 .. 32x32 pixels, at most 4x4 tokens.
QWEN_MIN_PIXELS = 16 * 16
QWEN_MAX_PIXELS = 32 * 32
# The tiny chat template: Qwen's turn format, without the default system turn.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_WORDS = ("user", "assistant", "\n")
PALIGEMMA_WORDS = ("answer", "en", "\n")


def build_paligemma(
    vocabulary: Sequence[str], template: str, seed: int, gemma2: bool
) -> tuple[Any, Any]:
    """Tiny ``PaliGemmaForConditionalGeneration`` (Gemma or Gemma 2) + processor."""
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import (
        SiglipImageProcessorPil,
    )

    tokenizer = word_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        prompt_words(vocabulary, template, PALIGEMMA_WORDS),
        pad="<pad>",
        eos="<eos>",
        bos="<bos>",
        unk="<unk>",
        image="<image>",
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    image_processor.image_seq_length = (IMAGE_SIZE // 4) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text: dict[str, Any] = {
        "vocab_size": len(tokenizer),  # with the processor's <locXXXX>/<segXXX>
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if gemma2:  # soft-capped logits and a sliding window shorter than the prompts
        text.update(
            sliding_window=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=8,
        )
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=4,
            vision_use_head=False,
        ),
        text_config=(Gemma2Config if gemma2 else GemmaConfig)(**text),
        image_token_index=processor.image_token_id,
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(config)
    return model, processor


def build_qwen2_vl(
    vocabulary: Sequence[str], template: str, seed: int, v25: bool
) -> tuple[Any, Any]:
    """Tiny ``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL) + processor."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<unk>",
    ]
    tokenizer = word_tokenizer(
        specials,
        prompt_words(vocabulary, template, QWEN_WORDS),
        pad="<|endoftext|>",
        eos="<|im_end|>",
        unk="<unk>",
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
    )
    name = "Qwen2_5_VL" if v25 else "Qwen2VL"
    processor_cls = image_only_processor_class(
        getattr(transformers, f"{name}Processor")
    )
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    vision: dict[str, Any] = {
        "depth": 1,
        "num_heads": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if v25:
        vision.update(
            hidden_size=16,
            out_hidden_size=32,
            intermediate_size=32,
            window_size=16,
            fullatt_block_indexes=[0],
        )
    else:
        vision.update(embed_dim=16, hidden_size=32)
    ids = tokenizer.convert_tokens_to_ids
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        # M-RoPE: 1 + 1 + 2 frequency pairs (temporal, height, width) = head_dim / 2
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [1, 1, 2],
            "rope_theta": 10000.0,
        },
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    config = getattr(transformers, f"{name}Config")(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForImageTextToText.from_config(config)
    return model, processor


TINY_BUILDERS: dict[str, Callable[[Sequence[str], str, int], tuple[Any, Any]]] = {
    "paligemma": lambda v, t, s: build_paligemma(v, t, s, gemma2=False),
    "paligemma2": lambda v, t, s: build_paligemma(v, t, s, gemma2=True),
    "qwen2_vl": lambda v, t, s: build_qwen2_vl(v, t, s, v25=False),
    "qwen2_5_vl": lambda v, t, s: build_qwen2_vl(v, t, s, v25=True),
    "idefics3": build_idefics3,
    "llava_onevision": build_llava_onevision,
}
# The prompt template each tiny checkpoint is meant for (``model.prompt_template``).
TINY_TEMPLATES: dict[str, str] = {
    "paligemma": "{image}answer en {question}",
    "paligemma2": "{image}answer en {question}",
    "qwen2_vl": "{image}{question}",
    "qwen2_5_vl": "{image}{question}",
    "idefics3": "{image}{question}",
    "llava_onevision": "{image}{question}",
}


def save_tiny_checkpoint(
    kind: str,
    path: str | Path,
    vocabulary: Sequence[str],
    template: str | None = None,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random checkpoint of ``kind`` (model + processor).

    Parameters
    ----------
    kind : str
        One of ``TINY_BUILDERS`` (``paligemma``, ``paligemma2``, ``qwen2_vl``,
        ``qwen2_5_vl``, ``idefics3``, ``llava_onevision``).
    path : str | Path
        Directory to write (created).
    vocabulary : Sequence[str]
        Words the tokenizer must know (the stream's vocabulary).
    template : str | None
        The prompt template it will be used with; ``TINY_TEMPLATES[kind]`` when None.
    seed : int
        Seeds the weights (the global RNG is left untouched).

    Returns
    -------
    Path
        The directory, loadable with ``model=pretrained model.path=<path>``.

    Raises
    ------
    ValueError
        Unknown ``kind``.
    """
    if kind not in TINY_BUILDERS:
        raise ValueError(
            f"Unknown tiny checkpoint kind {kind!r}; choose one of "
            f"{sorted(TINY_BUILDERS)}."
        )
    template = TINY_TEMPLATES[kind] if template is None else template
    model, processor = TINY_BUILDERS[kind](vocabulary, template, seed)
    path = Path(path)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fed_asr.models.tiny_families <kind> <dir> [words...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] not in TINY_BUILDERS:
        print(f"usage: <kind: {'|'.join(sorted(TINY_BUILDERS))}> <dir> [words...]")
        return 2
    vocabulary = args[2:]
    if not vocabulary:
        from fed_asr.config import DataConfig
        from fed_asr.data import build_stream

        vocabulary = build_stream(DataConfig(), 0).vocabulary()
    print(save_tiny_checkpoint(args[0], args[1], vocabulary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
