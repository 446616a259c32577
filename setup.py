"""linjax: linear attention and LLM linearization in JAX / Flax NNX."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.8.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "ml-collections>=1.1.0",
    "datasets>=4.0.0",
    "safetensors>=0.6.0",
    "gguf>=0.17.0",
    "numpy>=2.0",
    "tqdm>=4.66",
    "matplotlib>=3.9",
    "tensorboard>=2.16",
    "absl-py>=2.1",
]
TORCH = [
    # A CPU build of 2.13.0 lies on the CI machine; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers>=4.56",
    "accelerate>=1.0",
    "sentencepiece>=0.2",
    "tokenizers>=0.21",
]
DEV = TORCH + [
    "pytest>=8.0",
    "pytest-xdist>=3.6",
    "pytest-timeout>=2.3",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "einops>=0.8",
    "lm-eval>=0.4.13",
    "peft>=0.17",  # tests: linjax LoRA adapters exported in PEFT's format
]

setup(
    name="linjax",
    version="0.1.0",
    description="Linear attention and LLM linearization (SUPRA, LoLCATs, Liger, GLA, DeltaNet) in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",   # the jax / flax / orbax / numpy releases it needs
    packages=find_packages(include=["linjax", "linjax.*", "pallas_kernels", "pallas_kernels.*"]),
    # linjax.convert.hf: the PyTorch modeling code copied into HF exports of linearized models
    package_data={"linjax.eval": ["tasks/*"], "linjax.convert.hf": ["*.py"]},
    install_requires=CORE,
    extras_require={
        "torch": TORCH,
        "dev": DEV,
        # the kernels lower through Pallas' own Triton backend: no jax-triton needed
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["linjax=linjax.cli:main"]},
)
