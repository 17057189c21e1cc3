"""Runtime: onnxruntime sessions of model instances (CPU, CUDA, TensorRT), providers,
devices, I/O binding, pinned buffers and top-k on the device; no asyncio, no protobuf
service code."""
