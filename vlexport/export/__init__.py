"""Exporters: ONNX (torch.onnx dynamo), torch.compile / AOTInductor, TensorRT."""
