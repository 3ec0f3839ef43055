"""Pallas kernels: fused LoRA matmul and int4/NF4 weight-only matmul.

Each op takes `impl="pallas"|"reference"` and `interpret=None` (interpret
mode exactly when `jax.default_backend() == "cpu"`). Kernels use only the
Pallas API shared by the TPU (Mosaic) and GPU (Triton) lowerings; per-backend
tile rules live in `default_block_sizes`.
"""

from llmjax.kernels._tiling import BlockSizes
from llmjax.kernels._tiling import default_block_sizes
from llmjax.kernels._tiling import resolve_interpret
from llmjax.kernels.int4_matmul import Int4Weight
from llmjax.kernels.int4_matmul import NF4_CODE
from llmjax.kernels.int4_matmul import dequantize_int4
from llmjax.kernels.int4_matmul import int4_matmul
from llmjax.kernels.int4_matmul import int4_matmul_reference
from llmjax.kernels.int4_matmul import pack_int4
from llmjax.kernels.int4_matmul import quantize_int4
from llmjax.kernels.int4_matmul import unpack_int4
from llmjax.kernels.lora_matmul import lora_matmul
from llmjax.kernels.lora_matmul import lora_matmul_reference

__all__ = [
    "BlockSizes",
    "Int4Weight",
    "NF4_CODE",
    "default_block_sizes",
    "dequantize_int4",
    "int4_matmul",
    "int4_matmul_reference",
    "lora_matmul",
    "lora_matmul_reference",
    "pack_int4",
    "quantize_int4",
    "resolve_interpret",
    "unpack_int4",
]
