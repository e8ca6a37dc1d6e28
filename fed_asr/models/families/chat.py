"""Prompts of chat families: one user turn of the processor's chat template.

Qwen2-VL, LLaVA-OneVision and Idefics3 / SmolVLM were instruction-tuned on their
chat templates; a prompt is one user turn whose content is ``model.prompt_template``
with the image where ``{image}`` stands, followed by the generation prompt (the
assistant header). Where the image sits inside the turn is the template's business
(LLaVA-OneVision renders images before the text).
"""

from __future__ import annotations

from typing import Any

IMAGE_SLOT = "{image}"


def chat_prompt(processor: Any, template: str, question: str, family: str) -> str:
    """One user turn (``template`` with the image where ``{image}`` stands).

    Parameters
    ----------
    processor : Any
        The checkpoint's processor (with ``chat_template``).
    template : str
        ``model.prompt_template``, holding ``{image}`` and ``{question}``.
    question : str
        The question.
    family : str
        Family name for the error message.

    Returns
    -------
    str
        The rendered turn and the generation prompt, not tokenized.

    Raises
    ------
    ValueError
        The processor has no chat template.
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"The {type(processor).__name__} of this checkpoint has no chat "
            f"template; {family} prompts are built with it."
        )
    head, _, tail = template.partition(IMAGE_SLOT)
    before, after = (part.format(question=question) for part in (head, tail))
    content = [
        *([{"type": "text", "text": before.strip()}] if before.strip() else []),
        {"type": "image"},
        *([{"type": "text", "text": after.strip()}] if after.strip() else []),
    ]
    messages = [{"role": "user", "content": content}]
    return str(
        processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    )
