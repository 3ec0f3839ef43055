"""llmjax: pretrain, fine-tune (SFT), quantize and export Llama/Qwen2-style models in JAX."""

__version__ = "0.1.0"
