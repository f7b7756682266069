"""Generated wire contracts of privscore (see protos/ and scripts/generate_protos.py)."""
