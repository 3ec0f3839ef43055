"""Hugging Face interop: import Llama/Qwen2 safetensors folders, export runs as HF folders.

  convert      pure name/layout/config mapping (no I/O)
  export       `export_run`, `export_params`, `write_safetensors`
  import_      `import_hf`, `load_hf_params`
"""

from llmjax.hf.convert import SUPPORTED_ARCHITECTURES, config_from_hf, config_to_hf, iter_hf_tensors
from llmjax.hf.export import export_params, export_run, write_safetensors
from llmjax.hf.import_ import import_hf, load_hf_params

__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "config_to_hf", "iter_hf_tensors",
           "export_params", "export_run", "write_safetensors", "import_hf", "load_hf_params"]
