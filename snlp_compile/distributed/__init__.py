"""Depth parallelism across processes: the SNLP solve of a decoder's layer stack with its parallel
layers split over the ranks of a torch.distributed process group (gloo on CPU, NCCL on GPUs)."""

from .cache import LocalKVCache
from .module import DepthParallel, depth_parallel
from .partition import Partition, partition

__all__ = ["DepthParallel", "LocalKVCache", "Partition", "depth_parallel", "partition"]
