"""llmjax: pretrain, fine-tune (SFT), quantize and export Llama/Qwen2-style models in JAX."""
import setuptools

CORE = [
    "jax>=0.10,<0.13",
    "flax>=0.12,<0.14",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "array_record>=0.7",
    "sentencepiece>=0.2",
    "chex>=0.1.90",
    "absl-py>=2.1",
    "gin-config>=0.5",
    "safetensors>=0.4",
    "numpy>=1.26",
    "tensorboardX>=2.6",
    # Hugging Face tokenizer.json files (Llama 3, Qwen) are read and written through these.
    "tokenizers>=0.19",
    "protobuf>=4",
]

setuptools.setup(
    name="llmjax",
    version="0.1.0",
    description="Pretrain, fine-tune (SFT), quantize and export Llama/Qwen2-style models in JAX.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["llmjax", "llmjax.*"]),
    install_requires=CORE,
    extras_require={
        # torch (CPU build), transformers and peft are the real clients that prove HF and
        # PEFT interop; matplotlib draws the report card's plots the tests check.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch>=2.4,<2.14",
                 "transformers>=4.45", "peft>=0.13", "matplotlib>=3.7"],
        # The viewer for <workdir>/tensorboard (runs write the event files without it).
        "tensorboard": ["tensorboard>=2.15"],
        # `llmjax-scaling sweep` draws isoflop.png and `llmjax-report` its plots with it (the
        # fit and the report's tables are written without it).
        "plot": ["matplotlib>=3.7"],
        "gpu": ["jax[cuda12]>=0.10,<0.13"],
        "tpu": ["jax[tpu]>=0.10,<0.13"],
    },
    entry_points={
        "console_scripts": [
            "llmjax-train=llmjax.cli.train:run_main",
            "llmjax-generate=llmjax.cli.generate:run_main",
            "llmjax-tokenizer=llmjax.cli.tokenizer:run_main",
            "llmjax-export=llmjax.cli.export:run_main",
            "llmjax-import=llmjax.cli.import_:run_main",
            "llmjax-quantize=llmjax.cli.quantize:run_main",
            "llmjax-scaling=llmjax.cli.scaling:run_main",
            "llmjax-report=llmjax.cli.report:run_main",
        ]
    },
)
