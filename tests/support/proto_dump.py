"""Dump the fields of protobuf modules as JSON:
``python proto_dump.py ours|tritonclient|tritonclient_model_config``.

Run as a separate process for tritonclient: its modules and ours register the same
``inference.*`` names and cannot share one process's descriptor pool.
"""

from __future__ import annotations

import json
import sys


def _fields(descriptor, out: dict) -> None:
    out[descriptor.full_name] = {
        f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else
                 (f.enum_type.full_name if f.enum_type else ""),
                 f.containing_oneof.name if f.containing_oneof else ""]
        for f in descriptor.fields
    }
    for nested in descriptor.nested_types:
        _fields(nested, out)
    for enum in descriptor.enum_types:
        out[enum.full_name] = {v.name: [v.number] for v in enum.values}


def dump(modules) -> dict:
    out: dict = {}
    for module in modules:
        for message in module.DESCRIPTOR.message_types_by_name.values():
            _fields(message, out)
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            out[enum.full_name] = {v.name: [v.number] for v in enum.values}
        for service in module.DESCRIPTOR.services_by_name.values():
            out[service.full_name] = {
                m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods
            }
    return out


def main(which: str) -> None:
    if which == "tritonclient_model_config":
        from tritonclient.grpc import model_config_pb2

        json.dump(dump([model_config_pb2]), sys.stdout)
        return
    if which == "tritonclient":
        from tritonclient.grpc import model_config_pb2, service_pb2
    else:
        from onnxserve.protos import inference_pb2 as service_pb2
        from onnxserve.protos import model_config_pb2
    json.dump(dump([service_pb2, model_config_pb2]), sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
