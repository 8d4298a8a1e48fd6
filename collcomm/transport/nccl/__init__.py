"""The NCCL transport's foundation: a ctypes binding of libnccl and the checks that say, in one line,
why the GPU path cannot run here.

- :mod:`.binding`: where libnccl is (``COLLCOMM_NCCL_LIBRARY``, the nvidia-nccl wheel of the ``gpu``
  extra, the loader), the table of NCCL functions collcomm calls, NCCL's dtype and op numbers, the
  unique id, :class:`NcclError`;
- :mod:`.availability`: :func:`require_gpu` (NCCL, the CUDA driver, a GPU; NcclUnavailable naming
  the first missing).

Importing this package loads no library: libnccl is opened on the first :func:`library` call.
The GPU executor, communicators per group and the torch/CuPy surfaces come next (issue 17).
"""

from collcomm.errors import NcclUnavailable
from collcomm.transport.nccl.availability import gpu_problem, require_gpu
from collcomm.transport.nccl.binding import (DTYPES, OPS, NcclError, NcclLibrary, UniqueId, library, nccl_dtype,
                                             nccl_op)

__all__ = ["DTYPES", "OPS", "NcclError", "NcclLibrary", "NcclUnavailable", "UniqueId", "gpu_problem", "library",
           "nccl_dtype", "nccl_op", "require_gpu"]
