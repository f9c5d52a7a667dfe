"""Export: a quantized student to ONNX in a flavour (qdq, qcdq, qonnx), and the graph passes."""
