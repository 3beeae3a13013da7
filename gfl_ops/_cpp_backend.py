"""Placeholder until the C++ backend lands."""
from gfl_ops._extension import extension_error


class _Unbuilt:
    def __init__(self, name):
        self.name = name

    def unavailable_reason(self, device_type):
        return extension_error() or "not implemented yet"


CPU_BACKEND = _Unbuilt("cpu")
CUDA_BACKEND = _Unbuilt("cuda")
