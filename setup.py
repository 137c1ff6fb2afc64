"""Packaging for largeep_plugin.

Install the CPU build of torch first on a machine without a GPU (``pip install torch==2.13.0``): the range below
is satisfied by it, so pip then installs nothing more for torch.
"""
from setuptools import find_packages, setup

MEGATRON = ["megatron-core>=0.16,<0.17"]
DEEPSPEED = ["deepspeed>=0.19,<0.20"]
HF = ["transformers>=5.0", "safetensors>=0.4"]
# torchtitan 0.3.0 itself is installed by scripts/setup.sh with --no-deps: its datasets<4.8 pin needs
# huggingface-hub<2, which transformers>=5.23 refuses (our code imports no torchtitan dataset module). These are the
# dependencies torchtitan's model, distributed and config code imports; none asks for a torch other than >=2.11.
TORCHTITAN = ["torch_checkpointing>=0.1", "spmd_types==0.2.3", "tyro>=0.9", "torchdata>=0.8", "triton>=3",
              "safetensors>=0.4"]
MONITOR = ["tensorboard>=2.10"]  # the "monitor.tensorboard_dir" of the large_ep section, Megatron's writer
TEST = ["pytest>=7", "pytest-timeout>=2"]

setup(
    name="largeep_plugin",
    version="0.1.0",
    description="Large expert parallelism for Mixture-of-Experts training in Megatron-Core, DeepSpeed and Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["largeep_plugin", "largeep_plugin.*"]),
    package_data={"largeep_plugin": ["presets/*.yaml", "presets/*.json"]},
    install_requires=[
        "torch>=2.4",
        "pyyaml>=5.4",      # topology / model / cluster files (imported lazily by the loaders)
        "matplotlib>=3.5",  # PNG charts of the CLI (imported lazily by the plotting helpers)
    ],
    extras_require={
        "megatron": MEGATRON,
        "deepspeed": DEEPSPEED,
        "hf": HF,
        "torchtitan": TORCHTITAN,
        "monitor": MONITOR,
        "test": TEST,
        "all": MEGATRON + DEEPSPEED + HF + TORCHTITAN + MONITOR + TEST,
    },
    entry_points={"console_scripts": ["largeep=largeep_plugin.cli:main"]},
)
