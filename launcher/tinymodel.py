"""Writes small, loadable llama-architecture GGUF files: the demo model and the tests' models.

Nothing is downloaded: the weights are random, so the model generates meaningless tokens, but
llama-server loads it, answers /health and serves completions exactly as it would a real model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


@dataclass(frozen=True)
class TinyShape:
    """The shape of a generated model; defaults give a file of a few hundred KiB."""

    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    context_length: int = 2048
    weight_type: str = "f16"  # f32 | f16

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
        if self.weight_type not in ("f32", "f16"):
            raise ValueError(f"weight_type must be f32 or f16, not {self.weight_type!r}")


def write_tiny_llama(path: Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Write a llama model of ``shape`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = [*_SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256))]
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_head
    n_embd_kv = head_dim * shape.n_head_kv
    wtype = np.float16 if shape.weight_type == "f16" else np.float32

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(wtype)

    def norm() -> np.ndarray:
        return np.ones(shape.n_embd, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("launcher-tiny-llama")
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if wtype is np.float16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    )
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    writer.add_tensor("token_embd.weight", weight(n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(shape.n_embd, shape.n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, shape.n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
