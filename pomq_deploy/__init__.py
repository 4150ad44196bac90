"""pomq-deploy: post-training mixed 4/8-bit quantization of Vision Transformers, exported to Q/DQ ONNX and engines."""

__version__ = "0.1.0"
