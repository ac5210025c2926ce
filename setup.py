"""Packaging for LatentWire: `pip install -e .[dev]` (tests/run.sh and launch/demo.sh do this into .venv).

Versions are pinned to the set CI runs. torch is pinned to 2.13.0 only where no torch is installed yet, so an
existing CUDA build (e.g. on a GPU image) is kept rather than replaced.
"""

from setuptools import setup


def _torch_requirement() -> str:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch==2.13.0"
    return "torch"


INSTALL_REQUIRES = [
    _torch_requirement(),
    "deepspeed==0.19.8",
    "transformers==5.17.0",
    "tokenizers==0.23.3",
    "datasets==5.2.0",
    "safetensors==0.8.0",
    "triton==3.6.0",
    "ninja==1.13.2",
    "peft==0.21.2",
    "zstandard==0.25.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "numpy==2.4.6",
    "psutil==7.2.2",
    "gguf==0.19.0",  # latentwire.hub: reading the GGUF checkpoints of the real:* receivers
    "accelerate==1.16.0",  # transformers' GGUF loading path
    "tensorboard==2.21.0",  # training curves: torch.utils.tensorboard writes the event files
]

setup(
    name="latentwire",
    version="0.1.0",
    description="A learned soft-token interlingua that frozen LLMs of different families read through inputs_embeds",
    packages=["latentwire", "latentwire.features", "kernels", "launch"],
    package_data={"latentwire": ["assets/*.json", "assets/*.md"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": ["pytest==9.2.0"]},
)
