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
import random
import struct
import sys
from array import array
from pathlib import Path

from models_registry.tiny_tokenizer import CORPUS, tokenizer_json, train_bpe

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


# A tiny Llama the real CPU engine serves (docker/vllm-cpu/): head_dim 64, because vLLM's CPU
# attention has no kernel for head_dim 16; random weights, so its text is random too.
SERVABLE_SHAPE = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2}
SERVABLE_CONTEXT = 2048
SERVABLE_MERGES = 240
SPECIAL_TOKENS = ["<|begin|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WEIGHT_STD = 0.02  # the initializer_range of Llama's config: small enough that nothing overflows


def write_servable_model(
    directory: Path, *, seed: int = 0, embedding: bool = False, shards: int = 1, **shape: int
) -> int:
    """A tiny Llama with real random weights (BF16), a byte-level BPE tokenizer trained here, a
    chat template and a generation config; returns the parameter count. With ``embedding`` the
    checkpoint is a ``LlamaModel`` (no LM head) that vLLM serves on ``/v1/embeddings``. ``shape``
    overrides :data:`SERVABLE_SHAPE` (the benchmarks write a 1 GiB one)."""
    shape = SERVABLE_SHAPE | shape
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe(CORPUS, SERVABLE_MERGES)
    vocab = -(-(len(tokenizer.vocab) + len(SPECIAL_TOKENS)) // 64) * 64
    bos, eos = (len(tokenizer.vocab) + number for number in range(2))
    config = servable_config(vocab, bos, eos, shape, embedding=embedding)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "tokenizer.json").write_text(
        json.dumps(tokenizer_json(tokenizer, SPECIAL_TOKENS), ensure_ascii=False)
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(servable_tokenizer_config()))
    if not embedding:
        generation = {"bos_token_id": bos, "eos_token_id": eos, "max_new_tokens": 64}
        (directory / "generation_config.json").write_text(json.dumps(generation))
    tensors = servable_tensors(vocab, shape, embedding=embedding)
    rng = random.Random(seed)  # noqa: S311 - reproducible weights, not a secret
    if shards == 1:
        write_random_safetensors(directory / "model.safetensors", tensors, rng)
    else:
        write_random_shards(directory, tensors, rng, shards)
    return sum(math.prod(shape) for _, shape in tensors.values())


def write_random_shards(
    directory: Path,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    rng: random.Random,
    shards: int,
) -> None:
    """``model-0000N-of-0000M.safetensors`` and the index that maps each tensor to its shard."""
    names = list(tensors)
    weight_map: dict[str, str] = {}
    total = 0
    for number in range(shards):
        shard = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[number::shards]}
        total += write_random_safetensors(directory / shard, part, rng)
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def servable_config(
    vocab: int, bos: int, eos: int, shape: dict[str, int], *, embedding: bool
) -> dict:
    return {
        "architectures": ["LlamaModel" if embedding else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["hidden"] // shape["heads"],
        "vocab_size": vocab,
        "max_position_embeddings": SERVABLE_CONTEXT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": WEIGHT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
    }


def servable_tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "model_max_length": SERVABLE_CONTEXT,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def servable_tensors(
    vocab: int, shape: dict[str, int], *, embedding: bool
) -> dict[str, tuple[str, tuple[int, ...]]]:
    hidden, inter = shape["hidden"], shape["intermediate"]
    head_dim = hidden // shape["heads"]
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("BF16", (vocab, hidden)),
        "model.norm.weight": ("BF16", (hidden,)),
    }
    if not embedding:
        tensors["lm_head.weight"] = ("BF16", (vocab, hidden))
    for layer in range(shape["layers"]):
        prefix = f"model.layers.{layer}"
        tensors |= {
            f"{prefix}.self_attn.q_proj.weight": ("BF16", (shape["heads"] * head_dim, hidden)),
            f"{prefix}.self_attn.k_proj.weight": ("BF16", (shape["kv_heads"] * head_dim, hidden)),
            f"{prefix}.self_attn.v_proj.weight": ("BF16", (shape["kv_heads"] * head_dim, hidden)),
            f"{prefix}.self_attn.o_proj.weight": ("BF16", (hidden, shape["heads"] * head_dim)),
            f"{prefix}.mlp.gate_proj.weight": ("BF16", (inter, hidden)),
            f"{prefix}.mlp.up_proj.weight": ("BF16", (inter, hidden)),
            f"{prefix}.mlp.down_proj.weight": ("BF16", (hidden, inter)),
            f"{prefix}.input_layernorm.weight": ("BF16", (hidden,)),
            f"{prefix}.post_attention_layernorm.weight": ("BF16", (hidden,)),
        }
    return tensors


def write_random_safetensors(
    path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], rng: random.Random
) -> int:
    """Like :func:`write_safetensors`, with data: norm weights 1, the rest random BF16 values of
    magnitude 2^-7 to 2^-5 with a random sign (standard deviation about 0.019, near Llama's
    initializer_range), made from random bytes so that a 1 GiB checkpoint takes seconds.
    Returns the data size in bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    chunks: list[bytes] = []
    offset = 0
    for name, (dtype, shape) in tensors.items():
        count = math.prod(shape)
        if name.endswith("norm.weight"):
            chunks.append(_bfloat16(array("f", [1.0]) * count))
        else:
            chunks.append(random_bfloat16(count, rng))
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + 2 * count]}  # fmt: skip
        offset += 2 * count
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for chunk in chunks:
            handle.write(chunk)
    return offset


# The high byte of a little-endian BF16: the sign bit kept, the exponent's top bits 0111100, so
# the exponent is 120 or 121 (the low byte's top bit) and |x| lies in [2^-7, 2^-5).
_SMALL_HIGH_BYTE = bytes((byte & 0x80) | 0x3C for byte in range(256))


def random_bfloat16(count: int, rng: random.Random) -> bytes:
    """``count`` random small BF16 values (see :func:`write_random_safetensors`)."""
    raw = bytearray(rng.randbytes(2 * count))
    raw[1::2] = raw[1::2].translate(_SMALL_HIGH_BYTE)
    return bytes(raw)


def _bfloat16(values: array) -> bytes:
    """BF16 is float32 truncated to its upper 16 bits (little-endian: bytes 2 and 3 of each)."""
    if sys.byteorder != "little":
        values.byteswap()
    raw = values.tobytes()
    out = bytearray(len(raw) // 2)
    out[0::2] = raw[2::4]
    out[1::2] = raw[3::4]
    return bytes(out)
