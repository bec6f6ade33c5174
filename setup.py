"""Packaging for luffy-megatron.

megatron-core 0.17+ declares Requires-Python >= 3.12 although it runs on 3.11; the Makefile installs it with
``--ignore-requires-python --no-deps`` first, after which the range below is already satisfied.
"""

from setuptools import find_packages, setup

setup(
    name="luffy-megatron",
    version="0.1.0",
    description="LUFFY (mixed-policy GRPO with off-policy reasoning traces) on Megatron-core with SGLang rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["luffy_megatron", "luffy_megatron.*"]),
    install_requires=[
        "torch>=2.4",  # never pinned higher: a CPU wheel of any recent release works
        "megatron-core>=0.16.1",
        "numpy>=1.26,<2.5",  # megatron-core 0.19 requires numpy<2.5
        "packaging",
        "psutil>=5.9",  # megatron dist_checkpointing needs it but does not declare it
        "transformers>=4.51",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "datasets>=3.0",
        "pyarrow>=15",
        "omegaconf>=2.3",
        "math-verify>=0.7",
        "aiohttp>=3.9",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        # One tested set for CUDA 13 on Python 3.12 (docs/rollout.md "GPU install"): sglang pins its torch, and
        # transformer-engine's torch extension is a source package built with --no-build-isolation against it.
        "gpu": [
            "torch==2.14.1",
            "sglang==0.5.23",
            "sglang-router==0.3.2",
            "transformer-engine[core_cu13,pytorch]==2.20.2",
            "megatron-core==0.19.2",  # needs Python >= 3.12
        ],
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.17"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "luffy-train=luffy_megatron.train.cli:main",
            "luffy-eval=luffy_megatron.eval.cli:main",
            "luffy-plan=luffy_megatron.plan.cli:main",
        ]
    },
)
