from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import save as safetensors_save

from fedsilo.model import (
    ModelError,
    adapter_from_bytes,
    adapter_to_bytes,
    attach_lora,
    export_peft_folder,
    get_adapter_state,
    load_adapter,
    load_base_model,
    save_adapter,
    set_adapter_state,
)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _shifted(state: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
    return {name: tensor + amount for name, tensor in state.items()}


def test_same_init_seed_gives_the_same_adapter(make_lora: Callable[[int], PeftModel]) -> None:
    first = get_adapter_state(make_lora(7))
    second = get_adapter_state(make_lora(7))

    assert _states_equal(first, second)


def test_other_init_seed_gives_another_adapter(make_lora: Callable[[int], PeftModel]) -> None:
    first = get_adapter_state(make_lora(7))
    second = get_adapter_state(make_lora(8))

    assert not _states_equal(first, second)


def test_initial_adapter_does_not_change_the_model(
    tiny_model_dir: Path, make_lora: Callable[[int], PeftModel], prompt_ids: torch.Tensor
) -> None:
    base, _ = load_base_model(tiny_model_dir)
    with torch.no_grad():
        expected = base(input_ids=prompt_ids).logits

    wrapped = make_lora(0)
    with torch.no_grad():
        actual = wrapped(input_ids=prompt_ids).logits

    assert torch.equal(actual, expected)


def test_attach_leaves_the_global_rng_alone(make_lora: Callable[[int], PeftModel]) -> None:
    before = torch.get_rng_state()

    make_lora(3)

    assert torch.equal(torch.get_rng_state(), before)


def test_only_lora_parameters_are_trainable(lora_model: PeftModel) -> None:
    trainable = [name for name, p in lora_model.named_parameters() if p.requires_grad]

    assert trainable
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)


def test_adapter_state_has_one_a_and_b_per_target(lora_model: PeftModel) -> None:
    state = get_adapter_state(lora_model)

    # 2 layers x 7 projections x (A, B)
    assert len(state) == 2 * 7 * 2
    assert all(".default." not in name for name in state)
    assert {t.dtype for t in state.values()} == {torch.float32}


def test_unknown_target_module_lists_the_linear_modules(tiny_model_dir: Path) -> None:
    base, _ = load_base_model(tiny_model_dir)

    with pytest.raises(ModelError, match=r"\['qkv'\].*gate_proj.*q_proj"):
        attach_lora(base, rank=4, alpha=8.0, dropout=0.0, target_modules=["qkv"], init_seed=0)


def test_adapter_state_is_a_copy(lora_model: PeftModel) -> None:
    state = get_adapter_state(lora_model)
    name = next(iter(state))

    state[name].add_(1.0)

    assert not torch.equal(get_adapter_state(lora_model)[name], state[name])


def test_set_then_get_round_trips(lora_model: PeftModel) -> None:
    wanted = _shifted(get_adapter_state(lora_model), 0.25)

    set_adapter_state(lora_model, wanted)

    assert _states_equal(get_adapter_state(lora_model), wanted)


def test_set_changes_the_output(lora_model: PeftModel, prompt_ids: torch.Tensor) -> None:
    with torch.no_grad():
        before = lora_model(input_ids=prompt_ids).logits

    set_adapter_state(lora_model, _shifted(get_adapter_state(lora_model), 0.25))

    with torch.no_grad():
        after = lora_model(input_ids=prompt_ids).logits
    assert not torch.equal(before, after)


def test_set_rejects_a_wrong_name_and_changes_nothing(lora_model: PeftModel) -> None:
    before = get_adapter_state(lora_model)
    bad = _shifted(before, 1.0)
    first = next(iter(bad))
    bad["base_model.model.bogus.lora_A.weight"] = bad.pop(first)

    with pytest.raises(ModelError, match=r"missing.*unexpected.*bogus"):
        set_adapter_state(lora_model, bad)

    assert _states_equal(get_adapter_state(lora_model), before)


def test_set_rejects_a_wrong_shape_and_changes_nothing(lora_model: PeftModel) -> None:
    before = get_adapter_state(lora_model)
    bad = _shifted(before, 1.0)
    last = sorted(bad)[-1]
    bad[last] = torch.zeros(3, 3)

    with pytest.raises(ModelError, match=r"shape \(3, 3\)"):
        set_adapter_state(lora_model, bad)

    assert _states_equal(get_adapter_state(lora_model), before)


def test_set_rejects_non_finite_values(lora_model: PeftModel) -> None:
    bad = get_adapter_state(lora_model)
    name = sorted(bad)[-1]
    bad[name][0, 0] = float("nan")

    with pytest.raises(ModelError, match=name):
        set_adapter_state(lora_model, bad)


_names = st.text(alphabet="abcdefghij._", min_size=1, max_size=12)
_tensors = st.lists(
    st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=8
).map(lambda values: torch.tensor(values, dtype=torch.float32))


@settings(max_examples=50, deadline=None)
@given(state=st.dictionaries(_names, _tensors, max_size=5))
def test_bytes_round_trip(state: dict[str, torch.Tensor]) -> None:
    decoded = adapter_from_bytes(adapter_to_bytes(state))

    assert _states_equal(decoded, state)


@settings(max_examples=50, deadline=None)
@given(state=st.dictionaries(_names, _tensors, max_size=5))
def test_bytes_ignore_insertion_order(state: dict[str, torch.Tensor]) -> None:
    reordered = dict(reversed(list(state.items())))

    assert adapter_to_bytes(reordered) == adapter_to_bytes(state)


def test_bytes_of_a_real_adapter_are_deterministic(make_lora: Callable[[int], PeftModel]) -> None:
    first = adapter_to_bytes(get_adapter_state(make_lora(1)))
    second = adapter_to_bytes(get_adapter_state(make_lora(1)))

    assert first == second


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_from_bytes_rejects_non_finite_values(value: float) -> None:
    data = safetensors_save({"ok": torch.ones(2), "bad.weight": torch.tensor([1.0, value])})

    with pytest.raises(ModelError, match=r"bad\.weight.*NaN or infinite"):
        adapter_from_bytes(data)


def test_from_bytes_rejects_other_dtypes() -> None:
    data = safetensors_save({"half.weight": torch.ones(2, dtype=torch.float16)})

    with pytest.raises(ModelError, match=r"half\.weight is torch\.float16"):
        adapter_from_bytes(data)


def test_from_bytes_rejects_garbage() -> None:
    with pytest.raises(ModelError, match="not a valid safetensors adapter"):
        adapter_from_bytes(b"\x00" * 5)


def test_to_bytes_rejects_non_finite_values() -> None:
    with pytest.raises(ModelError, match=r"w.*NaN or infinite"):
        adapter_to_bytes({"w": torch.tensor([float("nan")])})


def test_save_and_load_round_trip(lora_model: PeftModel, tmp_path: Path) -> None:
    state = get_adapter_state(lora_model)
    path = tmp_path / "ckpt" / "adapter.safetensors"

    save_adapter(state, path)

    assert _states_equal(load_adapter(path), state)


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nothing\.safetensors"):
        load_adapter(tmp_path / "nothing.safetensors")


def test_load_names_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"not safetensors at all")

    with pytest.raises(ModelError, match=r"adapter file .*adapter\.safetensors"):
        load_adapter(path)


# PeftModel.from_pretrained reads a transformers attribute renamed in v5.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_exported_folder_loads_with_peft_and_gives_the_same_logits(
    lora_model: PeftModel, tiny_model_dir: Path, tmp_path: Path, prompt_ids: torch.Tensor
) -> None:
    state = _shifted(get_adapter_state(lora_model), 0.05)
    set_adapter_state(lora_model, state)
    with torch.no_grad():
        expected = lora_model(input_ids=prompt_ids).logits
    out = tmp_path / "export"

    export_peft_folder(lora_model, state, out, base_model_path=str(tiny_model_dir))

    base, _ = load_base_model(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        actual = loaded(input_ids=prompt_ids).logits
    assert torch.equal(actual, expected)


def test_exported_config_names_the_base_model(lora_model: PeftModel, tmp_path: Path) -> None:
    out = tmp_path / "export"

    export_peft_folder(
        lora_model, get_adapter_state(lora_model), out, base_model_path="/models/base"
    )

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "/models/base"
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")


def test_export_rejects_a_mismatched_state(lora_model: PeftModel, tmp_path: Path) -> None:
    state = get_adapter_state(lora_model)
    state.pop(sorted(state)[0])

    with pytest.raises(ModelError, match="missing"):
        export_peft_folder(lora_model, state, tmp_path / "export", base_model_path="x")

    assert not (tmp_path / "export").exists()


def test_export_refuses_an_existing_folder(lora_model: PeftModel, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()

    with pytest.raises(FileExistsError, match="export"):
        export_peft_folder(lora_model, get_adapter_state(lora_model), out, base_model_path="x")


def test_export_with_replace_swaps_the_folder(lora_model: PeftModel, tmp_path: Path) -> None:
    out = tmp_path / "export"
    state = get_adapter_state(lora_model)
    export_peft_folder(lora_model, state, out, base_model_path="old")

    export_peft_folder(lora_model, state, out, base_model_path="new", replace=True)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "new"
