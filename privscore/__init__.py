"""privscore for callers: the generated wire contracts (`privscore.v1`, from protos/ by
scripts/generate_protos.py) and the Python client (`privscore.client`). The server is `service`.
"""
