"""onnx_lower: lower ONNX CNNs to networks of MatMul, Add and Relu."""
