"""Commands that are clients of a server: `onnxserve demo` and `onnxserve health`."""
