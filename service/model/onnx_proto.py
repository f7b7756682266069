"""The few ONNX protobuf messages and fields the scorer reads or adds, without `onnx`.

Serving must not import the training stack (`onnx` included), yet the scorer reads the served
graph's structure and adds an input and a node to it (see `service.model.encoded`). The
messages below are a subset of onnx.proto (proto2) with its field numbers, in a private
descriptor pool: parsing keeps every field not declared here as an unknown field and
serialising writes it back unchanged, so what the scorer does not touch stays as it was.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "privscore.onnxsubset"
_F = descriptor_pb2.FieldDescriptorProto

# message -> (field name, number, type, repeated, packed, message type name)
_MESSAGES: dict[str, list[tuple[str, int, int, bool, bool, str]]] = {
    "ModelProto": [("graph", 7, _F.TYPE_MESSAGE, False, False, "GraphProto")],
    "GraphProto": [
        ("node", 1, _F.TYPE_MESSAGE, True, False, "NodeProto"),
        ("name", 2, _F.TYPE_STRING, False, False, ""),
        ("initializer", 5, _F.TYPE_MESSAGE, True, False, "TensorProto"),
        ("input", 11, _F.TYPE_MESSAGE, True, False, "ValueInfoProto"),
        ("output", 12, _F.TYPE_MESSAGE, True, False, "ValueInfoProto"),
        ("value_info", 13, _F.TYPE_MESSAGE, True, False, "ValueInfoProto"),
    ],
    "NodeProto": [
        ("input", 1, _F.TYPE_STRING, True, False, ""),
        ("output", 2, _F.TYPE_STRING, True, False, ""),
        ("name", 3, _F.TYPE_STRING, False, False, ""),
        ("op_type", 4, _F.TYPE_STRING, False, False, ""),
        ("attribute", 5, _F.TYPE_MESSAGE, True, False, "AttributeProto"),
        ("domain", 7, _F.TYPE_STRING, False, False, ""),
    ],
    "AttributeProto": [
        ("name", 1, _F.TYPE_STRING, False, False, ""),
        ("i", 3, _F.TYPE_INT64, False, False, ""),
        ("type", 20, _F.TYPE_INT32, False, False, ""),
        ("ints", 8, _F.TYPE_INT64, True, False, ""),
        ("strings", 9, _F.TYPE_BYTES, True, False, ""),
    ],
    "TensorProto": [
        ("dims", 1, _F.TYPE_INT64, True, False, ""),
        ("data_type", 2, _F.TYPE_INT32, False, False, ""),
        ("int64_data", 7, _F.TYPE_INT64, True, True, ""),
        ("name", 8, _F.TYPE_STRING, False, False, ""),
        ("raw_data", 9, _F.TYPE_BYTES, False, False, ""),
    ],
    "ValueInfoProto": [
        ("name", 1, _F.TYPE_STRING, False, False, ""),
        ("type", 2, _F.TYPE_MESSAGE, False, False, "TypeProto"),
    ],
    "TypeProto": [("tensor_type", 1, _F.TYPE_MESSAGE, False, False, "TensorTypeProto")],
    # TypeProto.Tensor in onnx.proto; nesting is not part of the wire format.
    "TensorTypeProto": [
        ("elem_type", 1, _F.TYPE_INT32, False, False, ""),
        ("shape", 2, _F.TYPE_MESSAGE, False, False, "TensorShapeProto"),
    ],
    "TensorShapeProto": [("dim", 1, _F.TYPE_MESSAGE, True, False, "Dimension")],
    "Dimension": [
        ("dim_value", 1, _F.TYPE_INT64, False, False, ""),
        ("dim_param", 2, _F.TYPE_STRING, False, False, ""),
    ],
}

FLOAT = 1  # TensorProto.DataType
INT64 = 7
ATTRIBUTE_INT = 2  # AttributeProto.AttributeType


def _classes() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(
        name="privscore_onnx_subset.proto", package=_PACKAGE, syntax="proto2"
    )
    for message, fields in _MESSAGES.items():
        proto = file.message_type.add(name=message)
        for name, number, kind, repeated, packed, type_name in fields:
            field = proto.field.add(
                name=name,
                number=number,
                type=kind,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
            )
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
            if packed:
                field.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        message: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{_PACKAGE}.{message}")
        )
        for message in _MESSAGES
    }


_CLASSES = _classes()
ModelProto: Any = _CLASSES["ModelProto"]
NodeProto: Any = _CLASSES["NodeProto"]
ValueInfoProto: Any = _CLASSES["ValueInfoProto"]


def attribute(node: Any, name: str) -> Any | None:
    """The node's attribute called `name`, or None."""
    return next((item for item in node.attribute if item.name == name), None)


def int64_values(tensor: Any) -> list[int] | None:
    """An INT64 initializer's values (from int64_data or little-endian raw_data)."""
    if tensor.data_type != INT64:
        return None
    if tensor.raw_data:
        data = bytes(tensor.raw_data)
        if len(data) % 8:
            return None
        return [
            int.from_bytes(data[i : i + 8], "little", signed=True) for i in range(0, len(data), 8)
        ]
    return list(tensor.int64_data)


def float_matrix_input(name: str, width: int) -> Any:
    """A graph input: float32 [rows, width], the number of rows left free."""
    info = ValueInfoProto(name=name)
    tensor = info.type.tensor_type
    tensor.elem_type = FLOAT
    tensor.shape.dim.add(dim_param=f"{name}_rows")
    tensor.shape.dim.add(dim_value=width)
    return info
