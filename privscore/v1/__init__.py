"""Generated code for the privscore.v1 protobuf package. Do not edit: run `make protos`."""
