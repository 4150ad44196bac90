"""Where the time goes inside one inference: readers for the profilers' own output.

``ort_trace`` turns ONNX Runtime's Chrome-trace JSON into time per operator type and per node;
``nsys`` builds the Nsight Systems command lines and reads its CUDA kernel summary. Both are pure
(text or parsed JSON in, dataclasses out), so they are tested on hand-made traces without a profiler.
"""

from ..errors import PomqError


class ProfileError(PomqError):
    """A profiler is missing, failed, or wrote something we cannot read."""
