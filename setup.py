"""dual_diffusion: D-DiT (Dual Diffusion Transformer) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="dual_diffusion",
    version="0.1.0",
    description="D-DiT: one MM-DiT for flow-matching images and masked-diffusion text, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dual_diffusion", "dual_diffusion.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # The PyTorch references the parity tests compare against (CPU build only).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "diffusers>=0.35",
            "transformers>=4.56",
            "protobuf>=4",
        ],
        "eval": ["pycocoevalcap>=1.2"],
        # libtpu for compiling the train step for a TPU slice from any host (train --dry_run --topology=...)
        # and for running on TPU VMs; libtpu must match jax, so this pins both (jax 0.10.2 -> libtpu 0.0.42.1).
        "tpu": ["jax[tpu]==0.10.2"],
        # gs:// workdirs and checkpoints (etils.epath reaches GCS through gcsfs).
        "gcs": ["gcsfs>=2024.2"],
    },
)
