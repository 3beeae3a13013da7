"""gfl-ops: fused Generalized Focal Loss operators (QFL, DFL, softmax-integral) for PyTorch.

Drop-in replacements for mmdetection's ``quality_focal_loss``, ``distribution_focal_loss`` and
``Integral``, with C++ (CPU), CUDA and Triton kernels behind one API.  See README.md.
"""

from gfl_ops._extension import extension_error, extension_loaded

# The C++ operators exist once _extension has loaded _C (``torch.ops.gfl_ops.*``); give them their
# fake kernels and autograd now, not at the first gfl_ops call, so that calling or tracing them
# directly right after ``import gfl_ops`` is already correct.  (Imported here rather than from
# _extension, which _cpp_backend itself imports: no import cycle.)
from gfl_ops import _cpp_backend  # noqa: E402, F401  isort: skip
from gfl_ops._registry import available_backends, backend_status
from gfl_ops.functional import (
    distribution_focal_loss,
    integral,
    quality_focal_loss,
    set_value_checks,
    weight_reduce_loss,
)
from gfl_ops.memory import (
    cpu_buffer_cache_info,
    empty_cpu_buffer_cache,
    set_cpu_buffer_cache_limit,
)
from gfl_ops.modules import DistributionFocalLoss, Integral, QualityFocalLoss

__version__ = "0.1.0"

__all__ = [
    "quality_focal_loss",
    "distribution_focal_loss",
    "integral",
    "QualityFocalLoss",
    "DistributionFocalLoss",
    "Integral",
    "available_backends",
    "backend_status",
    "set_value_checks",
    "weight_reduce_loss",
    "extension_loaded",
    "extension_error",
    "cpu_buffer_cache_info",
    "set_cpu_buffer_cache_limit",
    "empty_cpu_buffer_cache",
]
