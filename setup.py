"""vimpac: VIMPAC video pre-training (masked token prediction + contrastive) on DeepSpeed with Triton kernels.

`kernels/` and `tokenization/` install as `vimpac.kernels` and `vimpac.tokenization`: top-level names like
`kernels` clash with existing PyPI packages (docs/design.md §2).
"""

from setuptools import setup

setup(
    name="vimpac",
    version="0.1.0",
    description="VIMPAC video pre-training with DeepSpeed and Triton kernels",
    python_requires=">=3.10",
    packages=["vimpac", "vimpac.kernels", "vimpac.tokenization"],
    # The folders kernels/ and tokenization/ stay at the repository root; they install (and are imported) only as
    # vimpac.kernels and vimpac.tokenization, never as top-level packages.
    package_dir={
        "vimpac": "vimpac",
        "vimpac.kernels": "kernels",
        "vimpac.tokenization": "tokenization",
    },
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        # triton 3.6.0's interpreter breaks on numpy 2.4 (docs/design.md §11.1)
        "numpy>=1.24,<2.4",
        "einops>=0.7",
        "lmdb>=1.4",
        "av>=14",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pillow>=9.1",  # vimpac.visualize imports PIL itself (Image.Resampling)
    ],
    extras_require={
        # imageio-ffmpeg: an ffmpeg binary, the reference the tests hold --frame-selection ffmpeg against
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "ruff>=0.6", "imageio-ffmpeg>=0.5"],
    },
    entry_points={"console_scripts": ["vimpac=vimpac.cli:main"]},
)
