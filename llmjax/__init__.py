"""llmjax: pretrain, fine-tune, align and export Llama/Qwen2-style language models in JAX."""

__version__ = "0.1.0"
