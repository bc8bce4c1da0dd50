from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from fedsilo.model import load_base_model, write_tiny_llama


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_any_text(tiny_tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tiny_tokenizer(text)["input_ids"]

    assert tiny_tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "text", ["", " lead and trail ", "a  b\n\n\tc", "<|im_end|>x", "naïve 🎉 文字", "\x00\r\n"]
)
def test_tokenizer_round_trips_edge_cases(
    tiny_tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    ids = tiny_tokenizer(text)["input_ids"]

    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_maps_each_byte_to_one_token(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tiny_tokenizer("é!")["input_ids"]

    assert ids == [0xC3, 0xA9, ord("!")]


def test_chat_template_renders_chatml(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Code it."},
        {"role": "user", "content": "chest pain"},
    ]

    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert text == (
        "<|im_start|>system\nCode it.<|im_end|>\n"
        "<|im_start|>user\nchest pain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_eos_is_im_end(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base_model(tiny_model_dir)

    assert tokenizer.eos_token == "<|im_end|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_vocab_size_matches_tokenizer(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base_model(tiny_model_dir)

    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_shape_arguments_are_applied(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "m", hidden_size=32, num_layers=3, num_heads=2)

    model, _ = load_base_model(folder)

    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 3)
    assert model.config.num_attention_heads == 2


def test_refuses_to_overwrite_a_folder(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "m")

    with pytest.raises(FileExistsError, match="already exists"):
        write_tiny_llama(folder)
