"""Post-training quantization: observers and quantizers (pure math), schemes, the fake-quant model, calibration."""
