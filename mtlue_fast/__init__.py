"""mtlue_fast: unlearnable multi-task datasets (MTL-UE), with fused C++/CUDA ops."""

__version__ = "0.1.0"
