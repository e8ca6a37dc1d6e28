"""PaliGemma and PaliGemma 2: SigLIP, a linear projector and a Gemma / Gemma 2 decoder.

The image comes first, one block of ``(image_size // patch_size)^2`` tokens (row-major,
as in LLaVA), then ``<bos>``, the prompt and a newline; the answer follows with no
separator and ends with EOS (the big_vision prompt convention, which
``PaliGemmaProcessor`` implements). The model is a prefix-LM: the image and the prompt
attend to each other bidirectionally, the answer causally. That is what
``token_type_ids`` (0 on the prefix, 1 on the answer) tell the model. Positions start
at 1. PaliGemma 2's Gemma 2 decoder soft-caps its attention logits, which SDPA cannot
compute, so its attention implementation is eager.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fed_asr.models.families.llava import LlavaFamily
from fed_asr.models.family import EncodedImage


class PaliGemmaFamily(LlavaFamily):
    """``PaliGemmaForConditionalGeneration`` (``model_type`` ``"paligemma"``)."""

    model_types: ClassVar[tuple[str, ...]] = ("paligemma",)
    forward_inputs: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "token_type_ids",
    )
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    token_inputs: ClassVar[tuple[str, ...]] = ("token_type_ids",)
    add_special_tokens: ClassVar[bool] = False  # the prompt holds its own <bos>
    answer_separator: ClassVar[str] = ""
    prefix_lm: ClassVar[bool] = True
    # PaliGemma's positions are 1-indexed (``PaliGemmaModel.forward``).
    position_offset: ClassVar[int] = 1

    def attention_implementation(self, config: Any) -> str:
        """``"eager"`` when the decoder soft-caps attention logits (Gemma 2)."""
        softcap = getattr(config.text_config, "attn_logit_softcapping", None)
        return "sdpa" if softcap is None else "eager"

    def prompt_text(self, processor: Any, template: str, question: str) -> str:
        """Return ``<image><bos>{prompt}`` and a newline, the prompt from ``template``.

        Raises
        ------
        ValueError
            ``template`` puts text before ``{image}`` (PaliGemma reads the image
            first).
        """
        image = self.image_token(processor)
        text = template.format(image=image, question=question)
        if not text.startswith(image):
            raise ValueError(
                "PaliGemma reads the image first: `model.prompt_template` must start "
                f"with `{{image}}`, got {template!r}."
            )
        prompt = text[len(image) :].lstrip()
        return f"{image}{processor.tokenizer.bos_token}{prompt}\n"

    def encode_image(self, processor: Any, image: Any) -> EncodedImage:
        """``image_seq_length`` image tokens and the SigLIP pixel values."""
        token_id = processor.tokenizer.convert_tokens_to_ids(
            self.image_token(processor)
        )
        pixels = processor.image_processor(images=[image], return_tensors="pt")
        return EncodedImage(
            token_ids=[token_id] * int(processor.image_seq_length),
            inputs={"pixel_values": pixels["pixel_values"]},  # (1, 3, H, W)
        )

    def num_image_tokens(self, processor: Any, image: Any) -> int:
        """``processor.image_seq_length`` (every image gets the same block)."""
        return int(processor.image_seq_length)

    def token_inputs_of(
        self, input_ids: Tensor, prompt_length: Tensor, image_token_id: int
    ) -> dict[str, Tensor]:
        """``token_type_ids``: 0 on each row's prompt (the prefix), 1 after it."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        after = positions[None, :] >= prompt_length.to(input_ids.device)[:, None]
        return {"token_type_ids": after.long()}  # (B, S)

    def position_ids(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        """``1..S`` in every row (PaliGemma counts positions from 1)."""
        return super().position_ids(model, batch) + self.position_offset
