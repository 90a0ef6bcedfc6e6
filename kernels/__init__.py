"""Compute kernels (Triton on CUDA, PyTorch references elsewhere); imported as `vimpac.kernels`."""
