"""Front ends: one adapter per transport (gRPC, HTTP), messages in, data-plane calls,
messages out, one error-mapping decorator each; no batching and no onnxruntime here."""
