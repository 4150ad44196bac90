"""ONNX export: the fake-quant model under a plan as a QuantizeLinear/DequantizeLinear graph."""

from .onnx_export import ExportInfo, export_fp32, export_quantized

__all__ = ["ExportInfo", "export_fp32", "export_quantized"]
