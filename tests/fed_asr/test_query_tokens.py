"""Tests of fed_asr.query_tokens: function-word masks and query weights."""

from __future__ import annotations

import pytest
import torch

from fed_asr.query_tokens import (
    function_word_mask,
    normalise_token,
    query_token_weights,
)


class WordTokenizer:
    """Ids index a fixed word list."""

    vocab = ["<pad>", "\u2581What", "\u2581color", "\u2581is", "\u2581the", "shape?"]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]


def test_normalise_token_strips_subword_marks_and_punctuation() -> None:
    # Execute / Assert
    assert normalise_token("\u2581What") == "what"
    assert normalise_token("\u0120there?") == "there"
    assert normalise_token("##is") == "is"


def test_function_word_mask_marks_function_words_of_ragged_rows() -> None:
    # Execute
    mask = function_word_mask([["What", "color", "is", "it"], ["Is", "there", "a"]])

    # Assert
    expected = torch.tensor([[True, False, True, True], [True, True, True, False]])
    assert torch.equal(mask, expected)


def test_function_word_mask_from_ids_uses_tokenizer_and_custom_list() -> None:
    # Prepare
    ids = torch.tensor([[1, 2, 3, 4, 5, 0]])

    # Execute
    default = function_word_mask(ids, tokenizer=WordTokenizer())
    custom = function_word_mask(ids, ["shape", "COLOR"], tokenizer=WordTokenizer())

    # Assert
    assert default.tolist() == [[True, False, True, True, False, False]]
    assert custom.tolist() == [[False, True, False, False, True, False]]


def test_function_word_mask_ids_without_tokenizer_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        function_word_mask(torch.zeros(1, 2, dtype=torch.long))


def test_query_token_weights_mask_function_words_and_fall_back_to_prompt() -> None:
    # Prepare: the last query row is an answer token (outside the prompt); row 1
    # holds only function words
    prompt = torch.tensor([[True, True, True, False], [True, True, False, False]])
    function = torch.tensor([[True, False, False, True], [True, True, True, False]])

    # Execute
    paper = query_token_weights(prompt, function)
    ours = query_token_weights(prompt, function, mode="prompt")

    # Assert
    torch.testing.assert_close(paper, torch.tensor([[0.0, 1, 1, 0], [1.0, 1, 0, 0]]))
    torch.testing.assert_close(ours, prompt.float())


def test_query_token_weights_readout_is_the_last_prompt_token_of_each_row() -> None:
    # Prepare: ragged prompts (answer tokens after them), one row without a prompt
    prompt = torch.tensor(
        [[True, True, True, False], [True, False, False, False], [False] * 4]
    )

    # Execute
    readout = query_token_weights(prompt, mode="readout")

    # Assert
    expected = torch.tensor([[0.0, 0, 1, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    torch.testing.assert_close(readout, expected)


def test_query_token_weights_unknown_mode_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`mode` must be one of"):
        query_token_weights(torch.ones(1, 2, dtype=torch.bool), mode="content")
