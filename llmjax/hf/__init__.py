"""Hugging Face interop: import Llama/Qwen2/Mixtral/Qwen2-MoE safetensors folders, export runs
as HF folders, and move LoRA adapters to and from PEFT.

  convert      pure name/layout/config mapping (no I/O)
  export       `export_run` (a LoRA run merged, or its adapters alone), `export_params`,
               `write_safetensors`
  import_      `import_hf` (optionally with a PEFT LoRA adapter), `load_hf_params`
  peft         pure PEFT LoRA mapping: adapter tensor names, layouts, adapter_config.json
  adapters     PEFT folders: `export_adapter`, `load_adapter`
"""

from llmjax.hf.convert import SUPPORTED_ARCHITECTURES, config_from_hf, config_to_hf, iter_hf_tensors
from llmjax.hf.adapters import export_adapter
from llmjax.hf.export import export_params, export_run, write_safetensors
from llmjax.hf.import_ import import_hf, load_hf_params

__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "config_to_hf", "iter_hf_tensors",
           "export_adapter", "export_params", "export_run", "write_safetensors", "import_hf",
           "load_hf_params"]
