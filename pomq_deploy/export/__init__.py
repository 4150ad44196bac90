"""ONNX export: the fake-quant model under a plan as a QuantizeLinear/DequantizeLinear graph."""

from .onnx_export import TARGETS, ExportInfo, export_fp32, export_quantized

__all__ = ["TARGETS", "ExportInfo", "export_fp32", "export_quantized"]
