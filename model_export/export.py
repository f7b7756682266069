"""scikit-learn pipeline -> ONNX with one raw input per model feature and plain probabilities.

Target opsets are pinned to ai.onnx 18 and ai.onnx.ml 3 (every converter used here supports
them, and onnxruntime has run both for years). skl2onnx stamps each domain with the lowest
version its operators need, at most the target (ai.onnx.ml 1 for these models); the manifest
records the versions actually in the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.pipeline import Pipeline

from service.model.manifest import OnnxInput
from service.model.schema import FeatureSchema

ONNX_OPSET = 18
ONNX_ML_OPSET = 3
BAD_CLASS = 1  # labels are encoded 1 = bad, so classes_ is [0, 1]


class ExportError(RuntimeError):
    """The converted graph is not the shape the service expects."""


@dataclass(frozen=True)
class ExportedModel:
    onnx_bytes: bytes
    inputs: tuple[OnnxInput, ...]
    label_output: str
    probability_output: str
    bad_class_index: int
    opset: int
    ml_opset: int


def export_onnx(pipeline: Pipeline, schema: FeatureSchema, *, model_name: str) -> ExportedModel:
    inputs = tuple(
        OnnxInput(spec.name, "tensor(float)" if spec.is_numeric else "tensor(string)")
        for spec in schema.model_features
    )
    initial_types = [
        (spec.name, FloatTensorType([None, 1]) if spec.is_numeric else StringTensorType([None, 1]))
        for spec in schema.model_features
    ]
    model = convert_sklearn(
        pipeline,
        name=model_name,
        initial_types=initial_types,
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET},
        # No ZipMap: a plain [N, 2] float tensor instead of a list of per-row maps.
        options={id(pipeline): {"zipmap": False}},
    )
    # skl2onnx collects domains in a set: sort them so the same model gives the same bytes.
    imports = sorted(model.opset_import, key=lambda item: item.domain)
    del model.opset_import[:]
    model.opset_import.extend(imports)
    versions = {item.domain: item.version for item in imports}
    onnx.checker.check_model(model)
    graph_inputs = [item.name for item in model.graph.input]
    if graph_inputs != [item.name for item in inputs]:
        raise ExportError(f"ONNX inputs {graph_inputs} are not the model features in order")
    label_output, probability_output = _outputs(model)
    classes = [int(c) for c in pipeline.classes_]
    if sorted(classes) != [0, BAD_CLASS]:
        raise ExportError(f"expected binary classes [0, 1], got {classes}")
    return ExportedModel(
        onnx_bytes=model.SerializeToString(),
        inputs=inputs,
        label_output=label_output,
        probability_output=probability_output,
        bad_class_index=classes.index(BAD_CLASS),
        opset=versions.get("", ONNX_OPSET),
        ml_opset=versions.get("ai.onnx.ml", 0),
    )


def _outputs(model: onnx.ModelProto) -> tuple[str, str]:
    label = probabilities = None
    for output in model.graph.output:
        tensor = output.type.tensor_type
        if tensor.elem_type == TensorProto.INT64:
            label = output.name
        elif tensor.elem_type == TensorProto.FLOAT and len(tensor.shape.dim) == 2:
            probabilities = output.name
    if label is None or probabilities is None:
        names = [output.name for output in model.graph.output]
        raise ExportError(f"expected an int64 label and a float [N, 2] output, got {names}")
    return label, probabilities
