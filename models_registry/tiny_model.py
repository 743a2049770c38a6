"""A tiny but real model directory: a Llama-architecture ``config.json`` with tiny dimensions, a
real (tiny) ``tokenizer.json``, a ``tokenizer_config.json`` with a chat template, and
safetensors files written by hand (an 8-byte little-endian header length, a JSON header, then
the raw tensor bytes, zero-filled). Inspection accepts it as deployable; the tests build their
model directories with it and ``manage.py berth_demo`` writes the demo model with it::

    write_model(Path("var/demo/models/demo/tiny-llama"))
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "U8": 1}

# Shapes of a tiny Llama (hidden 64, 2 layers, vocab 128, GQA 4 heads / 2 KV heads).
HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS, KV_HEADS = 64, 128, 2, 128, 4, 2
HEAD_DIM = HIDDEN // HEADS

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

TOKENIZER_JSON = {
    "version": "1.0",
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
    "added_tokens": [{"id": 3, "content": "<|eot|>", "special": True}],
}

TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": "<|eot|>",
    "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


def llama_tensors(dtype: str = "BF16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of the tiny Llama, plus an integer buffer that is not a parameter."""
    tensors = {
        "model.embed_tokens.weight": (dtype, (VOCAB, HIDDEN)),
        "lm_head.weight": (dtype, (VOCAB, HIDDEN)),
    }
    tensors["model.norm.weight"] = (dtype, (HIDDEN,))
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        tensors |= {
            f"{prefix}.self_attn.q_proj.weight": (dtype, (HEADS * HEAD_DIM, HIDDEN)),
            f"{prefix}.self_attn.k_proj.weight": (dtype, (KV_HEADS * HEAD_DIM, HIDDEN)),
            f"{prefix}.self_attn.v_proj.weight": (dtype, (KV_HEADS * HEAD_DIM, HIDDEN)),
            f"{prefix}.self_attn.o_proj.weight": (dtype, (HIDDEN, HEADS * HEAD_DIM)),
            f"{prefix}.mlp.gate_proj.weight": (dtype, (INTERMEDIATE, HIDDEN)),
            f"{prefix}.mlp.up_proj.weight": (dtype, (INTERMEDIATE, HIDDEN)),
            f"{prefix}.mlp.down_proj.weight": (dtype, (HIDDEN, INTERMEDIATE)),
            f"{prefix}.input_layernorm.weight": (dtype, (HIDDEN,)),
            f"{prefix}.post_attention_layernorm.weight": (dtype, (HIDDEN,)),
        }
    tensors["model.position_ids"] = ("I64", (1, 2048))
    return tensors


def write_safetensors(
    path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], *, metadata: dict | None = None
) -> int:
    """Write a valid safetensors file (zero-filled data); returns the data size in bytes."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_SIZE[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.write(b"\0" * offset)
    return offset


def write_model(
    directory: Path, *, shards: int = 1, dtype: str = "BF16"
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A complete, valid tiny model directory; returns its tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (directory / "tokenizer.json").write_text(json.dumps(TOKENIZER_JSON))
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    tensors = llama_tensors(dtype)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", tensors)
        return tensors
    names = list(tensors)
    weight_map = {}
    for number in range(shards):
        shard = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[number::shards]}
        write_safetensors(directory / shard, part)
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors
