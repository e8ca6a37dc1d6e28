"""Collate VQA samples into right-padded MLLM batches with answer labels."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fed_asr.models.family import ModelFamily, get_model_family
from fed_asr.query_tokens import function_word_mask

if TYPE_CHECKING:
    from fed_asr.data import VQASample

IGNORE_INDEX = -100
# Model inputs of a collated LLaVA batch (the rest describe positions); other families
# take `VQACollator.model_input_keys`.
MODEL_INPUT_KEYS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "labels",
)
# Family of a collator built without one: that of the built-in tiny model.
DEFAULT_FAMILY = "llava"
# Processor outputs that the collator produces.
_COLLATED_INPUTS = frozenset({"input_ids", "attention_mask", "pixel_values"})


def _strip_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Drop a trailing EOS that some tokenizers append on their own."""
    return ids[:-1] if ids and eos_id is not None and ids[-1] == eos_id else ids


def continuation_ids(
    tokenizer: Any, prefixes: Sequence[str], texts: Sequence[str]
) -> list[list[int]]:
    """Token ids of ``" " + text`` as it is tokenized right after ``prefix``.

    Parameters
    ----------
    tokenizer : Any
        A transformers tokenizer.
    prefixes : Sequence[str]
        Text before each continuation (e.g. the prompt).
    texts : Sequence[str]
        Continuations (e.g. answers), one per prefix.

    Returns
    -------
    list[list[int]]
        Ids of each continuation, without EOS.

    Raises
    ------
    ValueError
        The tokenization of ``prefix + " " + text`` does not start with that of
        ``prefix`` (the tokenizer merges across the boundary).
    """
    eos_id = tokenizer.eos_token_id
    prefix_ids = tokenizer(list(prefixes), add_special_tokens=True)["input_ids"]
    full = [f"{p} {t}" for p, t in zip(prefixes, texts, strict=True)]
    full_ids = tokenizer(full, add_special_tokens=True)["input_ids"]
    result = []
    for prefix, text, head, ids in zip(
        prefixes, texts, prefix_ids, full_ids, strict=True
    ):
        head, ids = _strip_eos(head, eos_id), _strip_eos(ids, eos_id)
        if ids[: len(head)] != head:
            raise ValueError(
                f"Tokenizing {prefix!r} followed by {text!r} changes the tokens of the "
                "prefix; end `model.prompt_template` with a separator such as ':'."
            )
        result.append(ids[len(head) :])
    return result


class _PixelCache:
    """LRU cache of preprocessed pixel tensors per image path, bounded in bytes."""

    def __init__(self, image_processor: Any, max_bytes: int) -> None:
        self.image_processor = image_processor
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, paths: Sequence[str]) -> Tensor:
        """Pixel values (N, 3, H, W) for ``paths``, preprocessing the missing ones."""
        from fed_asr.data import load_image

        missing = list(dict.fromkeys(p for p in paths if p not in self._items))
        found: dict[str, Tensor] = {}
        if missing:
            images = [load_image(p) for p in missing]
            pixels = self.image_processor(images=images, return_tensors="pt")[
                "pixel_values"
            ]  # (M, 3, H, W)
            found = dict(zip(missing, pixels, strict=True))
        out = []
        for path in paths:
            value = found.get(path)
            if value is None:
                value = self._items[path]
                self._items.move_to_end(path)
            out.append(value)
        for path, value in found.items():
            self._put(path, value)
        return torch.stack(out)  # (N, 3, H, W)

    def _put(self, path: str, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self._items[path] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()


class VQACollator:
    """Turn ``VQASample`` lists into MLLM training / scoring batches.

    The prompt is ``prompt_template.format(image=<image token>, question=q)`` and the
    full text is ``prompt + " " + answer`` followed by EOS. Rows are right-padded, so
    the image block starts at the same position in every row (the text before
    ``{image}`` is fixed).

    Parameters
    ----------
    processor : Any
        The model's processor (``tokenizer``, ``image_processor``, image token).
    prompt_template : str
        Contains ``{image}`` and ``{question}``.
    answers : Sequence[str]
        Candidate answers; ``answer_index`` indexes this list.
    pixel_cache_mb : int
        Memory bound of the per-image pixel cache.
    family : ModelFamily | None
        Model family (image token, tokens per image, forward inputs); LLaVA when None.
        Pass ``model_family(model)`` for a loaded model.

    Raises
    ------
    ValueError
        ``prompt_template`` lacks ``{image}`` or ``{question}``.
    NotImplementedError
        The family's forward takes processor outputs the collator does not produce.

    Notes
    -----
    A batch holds ``input_ids (B, S)``, ``attention_mask (B, S)``, ``pixel_values
    (B, 3, H, W)``, ``labels (B, S)`` (-100 except answer tokens and EOS),
    ``answer_index (B,)`` (-1 when the answer is not a candidate), ``prompt_length
    (B,)``, ``query_mask (B, Tq)`` with ``Tq = S - image_end`` (True on the prompt
    tokens after the image block), ``function_mask (B, Tq)`` (its function words,
    ``function_words`` or ``fed_asr.query_tokens.FUNCTION_WORDS``), and the ints
    ``image_start``, ``image_end``.
    """

    def __init__(
        self,
        processor: Any,
        prompt_template: str,
        answers: Sequence[str],
        pixel_cache_mb: int = 512,
        family: ModelFamily | None = None,
        function_words: Sequence[str] | None = None,
    ) -> None:
        if "{image}" not in prompt_template or "{question}" not in prompt_template:
            raise ValueError(
                "`prompt_template` must contain `{image}` and `{question}`, "
                f"got {prompt_template!r}."
            )
        self.family = get_model_family(DEFAULT_FAMILY) if family is None else family
        missing = set(self.family.forward_inputs) - _COLLATED_INPUTS
        if missing:
            raise NotImplementedError(
                f"The model family {type(self.family).__name__} needs the processor "
                f"outputs {sorted(missing)}; VQACollator produces only "
                f"{sorted(_COLLATED_INPUTS)}."
            )
        # Model inputs of a collated batch: the family's processor outputs + labels.
        self.model_input_keys: tuple[str, ...] = (*self.family.forward_inputs, "labels")
        self.processor = processor
        self.function_words = function_words
        self.tokenizer = processor.tokenizer
        self.prompt_template = prompt_template
        self.answers = list(answers)
        self._answer_index = {a: i for i, a in enumerate(self.answers)}
        self.image_token: str = self.family.image_token(processor)
        self.image_token_id: int = self.tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.eos_id: int = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad is None else pad
        self._pixels = _PixelCache(processor.image_processor, pixel_cache_mb * 2**20)
        self._num_image_tokens: int | None = None

    def num_image_tokens(self, image_path: str) -> int:
        """Return how many tokens one image token expands into (cached)."""
        if self._num_image_tokens is None:
            from fed_asr.data import load_image

            self._num_image_tokens = self.family.num_image_tokens(
                self.processor, load_image(image_path)
            )
        return self._num_image_tokens

    def prompt(self, question: str) -> str:
        """Return the prompt text of one question (one image token)."""
        return self.prompt_template.format(image=self.image_token, question=question)

    def __call__(self, samples: Sequence[VQASample]) -> dict[str, Any]:
        """Collate ``samples`` (see the class notes for the keys)."""
        if len(samples) == 0:
            raise ValueError("`samples` must not be empty.")
        prompts = [self.prompt(s.question) for s in samples]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        answer_ids = continuation_ids(
            self.tokenizer, prompts, [s.answer for s in samples]
        )
        n_image = self.num_image_tokens(samples[0].image)
        rows, prompt_lengths, image_starts = [], [], []
        for prompt, head, answer in zip(prompts, prompt_ids, answer_ids, strict=True):
            head = _strip_eos(head, self.eos_id)
            if head.count(self.image_token_id) != 1:
                raise ValueError(
                    f"Prompt {prompt!r} must hold exactly one image token "
                    f"{self.image_token!r} (the question must not contain it)."
                )
            at = head.index(self.image_token_id)
            head = head[:at] + [self.image_token_id] * n_image + head[at + 1 :]
            rows.append(head + answer + [self.eos_id])
            prompt_lengths.append(len(head))
            image_starts.append(at)
        if len(set(image_starts)) != 1:
            raise ValueError(
                "The image block starts at different positions "
                f"{sorted(set(image_starts))}; "
                "the text before `{image}` in `prompt_template` must tokenize the same "
                "for every question."
            )
        image_start = image_starts[0]
        image_end = image_start + n_image
        seq_len = max(len(r) for r in rows)
        batch_size = len(rows)
        input_ids = torch.full((batch_size, seq_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        for i, (row, n_prompt) in enumerate(zip(rows, prompt_lengths, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
        prompt_length = torch.tensor(prompt_lengths, dtype=torch.long)
        positions = torch.arange(image_end, seq_len)  # (Tq,)
        query_mask = positions[None, :] < prompt_length[:, None]  # (B, Tq)
        answer_index = torch.tensor(
            [self._answer_index.get(s.answer, -1) for s in samples], dtype=torch.long
        )
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        if "pixel_values" in self.family.forward_inputs:
            batch["pixel_values"] = self._pixels.get([s.image for s in samples])
        return {
            **batch,
            "labels": labels,
            "answer_index": answer_index,
            "prompt_length": prompt_length,
            "query_mask": query_mask,
            # (B, Tq) function words of the prompt (masked out of the query weights)
            "function_mask": function_word_mask(
                input_ids[:, image_end:], self.function_words, self.tokenizer
            )
            & query_mask,
            "image_start": image_start,
            "image_end": image_end,
        }
