"""Small ONNX graphs that onnxserve runs beside the models (see generate.py)."""
