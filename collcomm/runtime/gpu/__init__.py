"""The GPU path's pure parts: a schedule lowered to NCCL point-to-point groups, reduction kernels
and events per CUDA stream (:mod:`.lowering`), and the order a rank issues them in from its host
thread (:mod:`.streams`). Nothing here imports CUDA, torch or NCCL: the GPU executor that runs
these programs on devices builds on them."""

from collcomm.runtime.gpu.lowering import DEFAULT_LANES, Lowering, RankProgram, lower, shards_for
from collcomm.runtime.gpu.streams import Stream, issue, issue_order

__all__ = ["DEFAULT_LANES", "Lowering", "RankProgram", "Stream", "issue", "issue_order", "lower", "shards_for"]
