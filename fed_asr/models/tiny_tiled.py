"""Tiny random checkpoints of the tiled-image families: Idefics3 and LLaVA-OneVision.

Both cut a large image into tiles and add a low-resolution view of the whole image.
The tiny ones keep that layout at toy sizes (hidden sizes 16-32, 1-2 layers) so the
tiles, their markers and the global view are all exercised:

- **Idefics3** (SmolVLM's layout): 64x64 images are resized to 32x32 and cut into
  2x2 tiles of 16x16 pixels; each tile (and the 16x16 global image after them) is
  4x4 patches of 4 px, pixel-shuffled by 2 into 2x2 tokens. The stitched map of the
  tiles is 4x4.
- **LLaVA-OneVision**: a 16x16 base image (4x4 tokens) and the anyres grid picked
  from 16..32 pixel pinpoints: a 64x64 image gets 2x2 crops, an 8x8 map of tokens
  with a newline token after each row.

Tokenizers are word-level (``fed_asr.models.tiny_tokenizer``) with the families'
special tokens; processors are the families' own (PIL image processors, so
torchvision is not needed), with a chat template in the family's turn format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fed_asr.models.processors import image_only_processor_class
from fed_asr.models.tiny_tokenizer import prompt_words, word_tokenizer

# Idefics3: tiles of 16 px (4x4 patches of 4 px, pixel shuffle 2 -> 2x2 tokens).
IDEFICS3_TILE = 16
IDEFICS3_LONGEST_EDGE = 32  # images are resized to 32 px: 2x2 tiles
IDEFICS3_SCALE = 2
# Idefics3's tile markers: <row_i_col_j> for up to 6x6 tiles.
IDEFICS3_TILE_TOKENS = tuple(
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)
)
# SmolVLM / Idefics3 turn format ("User:<image>question<end_of_utterance>\n").
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_WORDS = ("user", "assistant", "\n")
# LLaVA-OneVision: a 16 px base image of 4x4 patches, anyres crops up to 32x32.
ONEVISION_BASE = 16
ONEVISION_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
# LLaVA-OneVision's turn format: images first, then the text on a new line.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ '\\n' + item['text'] }}{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ONEVISION_WORDS = ("user", "assistant", "\n")


def _text_config(tokenizer: Any, model_type: str) -> dict[str, Any]:
    """A 2-layer decoder of hidden size 32 for ``tokenizer``'s vocabulary."""
    return {
        "model_type": model_type,
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }


def idefics3_processor(vocabulary: Sequence[str], template: str) -> Any:
    """Tiny ``Idefics3Processor``: 2x2 tiles + global image, 4 tokens each."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    tokenizer = word_tokenizer(
        [
            "<pad>",
            "<|im_start|>",
            "<end_of_utterance>",
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
            "<unk>",
            *IDEFICS3_TILE_TOKENS,
        ],
        prompt_words(vocabulary, template, IDEFICS3_WORDS),
        pad="<pad>",
        eos="<end_of_utterance>",
        unk="<unk>",
        image="<image>",
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IDEFICS3_LONGEST_EDGE},
        max_image_size={"longest_edge": IDEFICS3_TILE},
    )
    tile_tokens = (IDEFICS3_TILE // 4 // IDEFICS3_SCALE) ** 2
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=tile_tokens,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )


def idefics3_config(processor: Any, model_type: str = "idefics3") -> Any:
    """Tiny ``Idefics3Config`` (or ``SmolVLMConfig``) matching ``processor``."""
    import transformers

    tokenizer = processor.tokenizer
    name = "SmolVLMConfig" if model_type == "smolvlm" else "Idefics3Config"
    return getattr(transformers, name)(
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": IDEFICS3_TILE,
            "patch_size": 4,
        },
        text_config=_text_config(tokenizer, "llama"),
        scale_factor=IDEFICS3_SCALE,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_idefics3(
    vocabulary: Sequence[str], template: str, seed: int
) -> tuple[Any, Any]:
    """Tiny ``Idefics3ForConditionalGeneration`` (Llama decoder) + processor."""
    from transformers import AutoModelForImageTextToText

    processor = idefics3_processor(vocabulary, template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(idefics3_config(processor))
    return model, processor


def build_llava_onevision(
    vocabulary: Sequence[str], template: str, seed: int
) -> tuple[Any, Any]:
    """Tiny ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2) + processor."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (  # noqa: E501
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = word_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>"],
        prompt_words(vocabulary, template, ONEVISION_WORDS),
        pad="<|endoftext|>",
        eos="<|im_end|>",
        unk="<unk>",
        image="<image>",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": ONEVISION_BASE, "width": ONEVISION_BASE},
        image_grid_pinpoints=ONEVISION_PINPOINTS,
    )
    processor = image_only_processor_class(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(ONEVISION_BASE // 4) ** 2,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": ONEVISION_BASE,
            "patch_size": 4,
            "vision_use_head": False,
        },
        text_config=_text_config(tokenizer, "qwen2"),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    return model, processor
