"""TensorRT: not installable on CPU machines; asking for it says what is missing and how to get it."""

from . import BackendError


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, **_options):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise BackendError("the tensorrt backend needs NVIDIA TensorRT and a CUDA GPU, and the tensorrt Python "
                               "package is not installed here: pip install 'pomq-deploy[gpu]' on a machine with an "
                               "NVIDIA GPU, or use --backend ort-cpu") from None
        raise BackendError("the tensorrt backend is not implemented yet (issue 6); use --backend ort-cpu")
