"""A tiny random-init Llama with a byte-level tokenizer, written to disk without any download.

Tests and demos use it in place of a real base model: it has the same folder layout, the same
chat format as SmolLM2 (ChatML) and loads through the same code path, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedsilo.storage import atomic_folder

_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"
_PAD = "<|pad|>"

# ChatML, the shape SmolLM2 uses, without its default system prompt.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_llama(
    folder: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_positions: int = 512,
) -> Path:
    """Write a complete Hugging Face folder for a small random-init ``LlamaForCausalLM``.

    The folder holds config.json, model.safetensors, generation_config.json and a byte-level
    tokenizer (every string round-trips exactly) with ``<|im_start|>``, ``<|im_end|>`` (eos)
    and ``<|pad|>`` and a ChatML chat template. Weights depend only on ``seed`` and the shape
    arguments, so the same call writes byte-identical weights. The folder appears atomically;
    an existing ``folder`` is an error (FileExistsError). Returns ``folder``.
    """
    folder = Path(folder)
    tokenizer = _byte_tokenizer()
    tokenizer.model_max_length = max_positions
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Tied like SmolLM2, so tests exercise the same save/load path as the real model.
        tie_word_embeddings=True,
    )
    # Seed a private copy of the RNG: writing a model must not shift anyone else's draws.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte (ids 0-255), no merges, ChatML specials."""
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[byte]: byte for byte in range(256)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: text maps to its bytes and back, nothing added.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        eos_token=_IM_END,
        pad_token=_PAD,
        bos_token=_IM_START,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte value (the ByteLevel alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping
