"""The model team's side of privscore: data -> schema -> train -> ONNX -> sign -> verify.

Imports nothing from `service` but the shared artifact format (`service.model.schema`,
`service.model.manifest`). Needs the `train` extra (scikit-learn, skl2onnx, onnx, matplotlib).
"""

import os

# Set before anything here imports onnxruntime (verify, parity checks, tests).
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
