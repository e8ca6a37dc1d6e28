"""Collate VQA samples into right-padded MLLM batches with answer labels."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fed_asr.models.family import EncodedImage, ModelFamily, get_model_family
from fed_asr.query_tokens import function_word_mask

if TYPE_CHECKING:
    from fed_asr.data import VQASample

IGNORE_INDEX = -100
# Model inputs of a collated LLaVA batch (the rest describe positions); other families
# take `VQACollator.model_input_keys` (or `fed_asr.models.model_inputs`).
MODEL_INPUT_KEYS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "labels",
)
# Family of a collator built without one: that of the built-in tiny model.
DEFAULT_FAMILY = "llava"
# Text inputs that every collated batch holds.
_TEXT_INPUTS = frozenset({"input_ids", "attention_mask"})


def _strip_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Drop a trailing EOS that some tokenizers append on their own."""
    return ids[:-1] if ids and eos_id is not None and ids[-1] == eos_id else ids


def continuation_ids(
    tokenizer: Any,
    prefixes: Sequence[str],
    texts: Sequence[str],
    separator: str = " ",
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """Token ids of ``separator + text`` as it is tokenized right after ``prefix``.

    Parameters
    ----------
    tokenizer : Any
        A transformers tokenizer.
    prefixes : Sequence[str]
        Text before each continuation (e.g. the prompt).
    texts : Sequence[str]
        Continuations (e.g. answers), one per prefix.
    separator : str
        Text between prefix and continuation. With ``""`` the continuation is
        tokenized on its own, as PaliGemma's processor tokenizes its suffix.
    add_special_tokens : bool
        Whether the prefix is tokenized with the tokenizer's special tokens.

    Returns
    -------
    list[list[int]]
        Ids of each continuation, without EOS.

    Raises
    ------
    ValueError
        The tokenization of ``prefix + separator + text`` does not start with that
        of ``prefix`` (the tokenizer merges across the boundary).
    """
    eos_id = tokenizer.eos_token_id
    if separator == "":
        alone = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [_strip_eos(list(ids), eos_id) for ids in alone]
    encode = {"add_special_tokens": add_special_tokens}
    prefix_ids = tokenizer(list(prefixes), **encode)["input_ids"]
    full = [f"{p}{separator}{t}" for p, t in zip(prefixes, texts, strict=True)]
    full_ids = tokenizer(full, **encode)["input_ids"]
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


class _ImageCache:
    """LRU cache of encoded images (tokens + processor outputs) per path, in bytes."""

    def __init__(self, family: ModelFamily, processor: Any, max_bytes: int) -> None:
        self.family = family
        self.processor = processor
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, EncodedImage] = OrderedDict()
        self._bytes = 0

    def get(self, paths: Sequence[str]) -> list[EncodedImage]:
        """Return the encoded images of ``paths``, encoding the missing ones."""
        from fed_asr.data import load_image

        found: dict[str, EncodedImage] = {}
        for path in dict.fromkeys(paths):
            if path in self._items:
                self._items.move_to_end(path)
                found[path] = self._items[path]
            else:
                found[path] = self.family.encode_image(self.processor, load_image(path))
                self._put(path, found[path])
        return [found[p] for p in paths]

    def _put(self, path: str, value: EncodedImage) -> None:
        size = value.nbytes()
        if size > self.max_bytes:
            return
        self._items[path] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes()


class VQACollator:
    """Turn ``VQASample`` lists into MLLM training / scoring batches.

    The prompt is the family's ``prompt_text`` (by default
    ``prompt_template.format(image=<image token>, question=q)``; chat families apply
    the processor's chat template) and the full text is the prompt, the family's
    ``answer_separator``, the answer and EOS. The image placeholder is replaced by the
    tokens of its image (``ModelFamily.encode_image``: as many as its resolution,
    crops or tiles give). Rows are right-padded, so the image block starts at the
    same position in every row (the text before ``{image}`` is fixed).

    Parameters
    ----------
    processor : Any
        The model's processor (``tokenizer``, ``image_processor``, image token).
    prompt_template : str
        Contains ``{image}`` and ``{question}``.
    answers : Sequence[str]
        Candidate answers; ``answer_index`` indexes this list.
    pixel_cache_mb : int
        Memory bound of the per-image cache of encoded images.
    family : ModelFamily | None
        Model family (prompt format, image tokens, forward inputs); LLaVA when None.
        Pass ``model_family(model)`` for a loaded model.
    function_words : Sequence[str] | None
        Words masked out of the query weights (``function_mask``).

    Raises
    ------
    ValueError
        ``prompt_template`` lacks ``{image}`` or ``{question}``.
    NotImplementedError
        The family's forward takes processor outputs the collator does not produce.

    Notes
    -----
    A batch holds ``input_ids (B, S)``, ``attention_mask (B, S)``, the family's image
    inputs (e.g. ``pixel_values (B, 3, H, W)``; Qwen2-VL: flat patches and
    ``image_grid_thw``) and token inputs (PaliGemma: ``token_type_ids``; Qwen2-VL:
    ``mm_token_type_ids``), ``labels (B, S)`` (-100 except answer tokens and EOS),
    ``answer_index (B,)`` (-1 when the answer is not a candidate), ``prompt_length
    (B,)``, ``query_mask (B, Tq)`` with ``Tq = S - image_end`` (True on the prompt
    tokens after the image block), ``function_mask (B, Tq)`` (its function words,
    ``function_words`` or ``fed_asr.query_tokens.FUNCTION_WORDS``), and the ints
    ``image_start``, ``image_end`` (the block of the image's tokens).
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
        produced = _TEXT_INPUTS | set(self.family.image_inputs)
        missing = (
            set(self.family.forward_inputs) - produced - set(self.family.token_inputs)
        )
        if missing:
            raise NotImplementedError(
                f"The model family {type(self.family).__name__} needs the processor "
                f"outputs {sorted(missing)}; VQACollator produces only "
                f"{sorted(produced | set(self.family.token_inputs))}."
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
        self._pixels = _ImageCache(self.family, processor, pixel_cache_mb * 2**20)

    def num_image_tokens(self, image_path: str) -> int:
        """Return how many image tokens the image's placeholder expands into."""
        encoded = self._pixels.get([image_path])[0]
        return encoded.token_ids.count(self.image_token_id)

    def prompt(self, question: str) -> str:
        """Return the prompt text of one question (one image placeholder)."""
        return self.family.prompt_text(self.processor, self.prompt_template, question)

    def candidate_token_ids(self, eos: bool = True) -> list[list[int]]:
        """Token ids of every candidate answer as the labels hold them (+ EOS)."""
        answer_ids = continuation_ids(
            self.tokenizer,
            [self.prompt("")] * len(self.answers),
            self.answers,
            self.family.answer_separator,
            self.family.add_special_tokens,
        )
        for answer, tokens in zip(self.answers, answer_ids, strict=True):
            if not tokens:
                raise ValueError(f"Candidate answer {answer!r} tokenizes to no token.")
        return [ids + ([self.eos_id] if eos else []) for ids in answer_ids]

    def __call__(self, samples: Sequence[VQASample]) -> dict[str, Any]:
        """Collate ``samples`` (see the class notes for the keys)."""
        if len(samples) == 0:
            raise ValueError("`samples` must not be empty.")
        family = self.family
        prompts = [self.prompt(s.question) for s in samples]
        prompt_ids = self.tokenizer(
            prompts, add_special_tokens=family.add_special_tokens
        )["input_ids"]
        answer_ids = continuation_ids(
            self.tokenizer,
            prompts,
            [s.answer for s in samples],
            family.answer_separator,
            family.add_special_tokens,
        )
        images = self._pixels.get([s.image for s in samples])
        rows, prompt_lengths, blocks = [], [], []
        for prompt, head, answer, image in zip(
            prompts, prompt_ids, answer_ids, images, strict=True
        ):
            head = _strip_eos(head, self.eos_id)
            if head.count(self.image_token_id) != 1:
                raise ValueError(
                    f"Prompt {prompt!r} must hold exactly one image token "
                    f"{self.image_token!r} (the question must not contain it)."
                )
            at = head.index(self.image_token_id)
            head = head[:at] + image.token_ids + head[at + 1 :]
            rows.append(head + answer + [self.eos_id])
            prompt_lengths.append(len(head))
            blocks.append((at, at + len(image.token_ids)))
        if len({start for start, _ in blocks}) != 1:
            raise ValueError(
                "The image block starts at different positions "
                f"{sorted({start for start, _ in blocks})}; "
                "the text before `{image}` in `prompt_template` must tokenize the same "
                "for every question."
            )
        if len(set(blocks)) != 1:
            raise ValueError(
                "The images of the batch expand to different numbers of tokens "
                f"{sorted({end - start for start, end in blocks})} (their resolution "
                "or tile count differs); resize them to one size, or bound the "
                "checkpoint's image processor (e.g. Qwen2-VL `min_pixels` = "
                "`max_pixels`), so that one batch shares one image layout."
            )
        image_start, image_end = blocks[0]
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
        wanted = set(family.forward_inputs)
        batch.update(
            (k, v) for k, v in family.collate_images(images).items() if k in wanted
        )
        batch.update(
            (k, v)
            for k, v in family.token_inputs_of(
                input_ids, prompt_length, self.image_token_id
            ).items()
            if k in wanted
        )
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
