"""Writes small, loadable llama-architecture GGUF files: the demo model and the tests' models.

Nothing is downloaded: the weights are random, so the model generates meaningless tokens, but
llama-server loads it, answers /health and serves completions exactly as it would a real model.
With `header_only`, any shape (a 70B model, a 150k vocabulary) is written as a header whose data is a
sparse hole: input for the planner that costs no disk and is never loaded.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from launcher.plan.gguf import parse_header

_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


@dataclass(frozen=True)
class TinyShape:
    """The shape of a generated model; defaults give a file of a few hundred KiB."""

    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    context_length: int = 2048
    weight_type: str = "f16"  # f32 | f16 | q8_0
    extra_tokens: int = 0  # beyond the 3 special and 256 byte tokens
    head_dim: int | None = None  # default n_embd / n_head
    tied_output: bool = False  # no output.weight: llama.cpp reuses token_embd

    def __post_init__(self) -> None:
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must divide by n_head_kv")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError("n_embd must divide by n_head (or give head_dim)")
        if self.weight_type not in _TYPES:
            raise ValueError(f"weight_type must be one of {', '.join(_TYPES)}, not {self.weight_type!r}")
        if self.weight_type == "q8_0" and (self.n_embd % 32 or self.n_ff % 32):
            raise ValueError("q8_0 needs n_embd and n_ff divisible by 32")

    @property
    def n_vocab(self) -> int:
        return len(_SPECIAL_TOKENS) + 256 + self.extra_tokens

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


def _aligned(offset: int) -> int:
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    return (offset + alignment - 1) // alignment * alignment


def add_byte_vocab(writer: gguf.GGUFWriter, extra_tokens: int) -> None:
    """A `llama` (SentencePiece) vocabulary llama-server accepts for any architecture: 3 specials, the 256
    byte tokens, then ``extra_tokens`` plain ones."""
    tokens = [*_SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *(f"t{i}" for i in range(extra_tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    specials = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    writer.add_token_types(specials + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * extra_tokens)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def add_tensor_hole(writer: gguf.GGUFWriter, name: str, dims: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> int:
    """Declare a tensor of numpy shape ``dims`` whose data will be part of the file's hole; the bytes it
    takes in the data section (each tensor's data starts aligned)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    nbytes = int(np.prod(dims)) // block * size
    writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=kind)
    return _aligned(nbytes)


def close_with_hole(writer: gguf.GGUFWriter, path: Path, data_bytes: int) -> None:
    """Write the header and the tensor infos, and make the ``data_bytes`` of the data section a sparse hole:
    the file has its full size and no blocks; the tensors read as zeros."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with path.open("r+b") as f:
        f.truncate(_aligned(f.seek(0, os.SEEK_END)) + data_bytes)


def _close_split_with_holes(writer: gguf.GGUFWriter, path: Path, shards: int) -> None:
    """Each part of a split model: its header, then its tensors' data as a sparse hole (where the header
    says that data ends)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    for no in range(1, shards + 1):
        part = path.with_name(f"{path.stem}-{no:05d}-of-{shards:05d}.gguf")
        data_end = parse_header(part.read_bytes(), part, 2**62)[3]  # any size: the part is its header yet
        with part.open("r+b") as f:
            f.truncate(data_end)


def _tensors(shape: TinyShape) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape, quantisable) for every tensor of the model."""
    e, f, v = shape.n_embd, shape.n_ff, shape.n_vocab
    q_dim, kv_dim = shape.dim_head * shape.n_head, shape.dim_head * shape.n_head_kv
    result: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (v, e), True)]
    for i in range(shape.n_layer):
        result += [
            (f"blk.{i}.attn_norm.weight", (e,), False),
            (f"blk.{i}.attn_q.weight", (q_dim, e), True),
            (f"blk.{i}.attn_k.weight", (kv_dim, e), True),
            (f"blk.{i}.attn_v.weight", (kv_dim, e), True),
            (f"blk.{i}.attn_output.weight", (e, q_dim), True),
            (f"blk.{i}.ffn_norm.weight", (e,), False),
            (f"blk.{i}.ffn_gate.weight", (f, e), True),
            (f"blk.{i}.ffn_up.weight", (f, e), True),
            (f"blk.{i}.ffn_down.weight", (e, f), True),
        ]
    result.append(("output_norm.weight", (e,), False))
    if not shape.tied_output:
        result.append(("output.weight", (v, e), True))
    return result


def write_tiny_llama(
    path: Path, shape: TinyShape = TinyShape(), seed: int = 0, header_only: bool = False, shards: int = 1
) -> Path:
    """Write a llama model of ``shape`` to ``path`` (parents created) and return the path. With ``shards``,
    a split model `NAME-00001-of-0000N.gguf` beside ``path``: the first shard's path is returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    qtype = _TYPES[shape.weight_type]

    tensors = _tensors(shape)
    per_shard = -(-len(tensors) // shards) if shards > 1 else 0
    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=per_shard)
    writer.add_name("launcher-tiny-llama")
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    if shape.head_dim is not None:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.dim_head)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types.get(shape.weight_type, gguf.LlamaFileType.MOSTLY_Q8_0))
    add_byte_vocab(writer, shape.extra_tokens)

    total = 0
    for name, dims, quantisable in tensors:
        kind = qtype if quantisable else gguf.GGMLQuantizationType.F32
        if header_only:
            total += add_tensor_hole(writer, name, dims, kind)
            continue
        values = (rng.standard_normal(dims) * 0.02).astype(np.float32) if quantisable else np.ones(dims, np.float32)
        if kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        elif kind == gguf.GGMLQuantizationType.Q8_0:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, values)

    if header_only and shards > 1:
        _close_split_with_holes(writer, path, shards)
    elif header_only:
        close_with_hole(writer, path, total)
    else:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path.with_name(f"{path.stem}-00001-of-{shards:05d}.gguf") if shards > 1 else path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny llama-architecture GGUF model.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--layers", type=int, default=TinyShape.n_layer)
    args = parser.parse_args(argv)
    if args.path.exists():
        print(f"{args.path} exists; kept")
        return
    write_tiny_llama(args.path, TinyShape(n_layer=args.layers))
    print(f"wrote {args.path} ({args.path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
