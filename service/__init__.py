"""privscore: a privacy-aware credit-scoring gRPC service and its client SDK."""
