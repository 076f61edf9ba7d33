"""The Open Inference Protocol over gRPC (KServe's `inference.GRPCInferenceService`, what
`tritonclient.grpc` speaks), in the same process and on the same event loop as the HTTP service:
tensors.py (protobuf <-> arrays), servicer.py (the RPCs), server.py (the server, health, reflection).
"""
