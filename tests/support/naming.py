"""Texts that are not model names or version numbers (onnxserve.protos.naming), for the naming
tests in process and against a server."""

from __future__ import annotations

from onnxserve.protos.naming import MAX_MODEL_NAME, MAX_VERSION

#: names the server will not serve, each for a different reason
BAD_NAMES = ["../evil", "my model", ".hidden", "-flag", "a/b", "", "x" * (MAX_MODEL_NAME + 1),
             "caf\u00e9", "tab\there", "new\nline", ".", ".."]
#: version texts that name no version: str.isdigit() takes the first three
BAD_VERSIONS = ["\u00b2", "\u0663", "\uff11", "+1", " 1", "1 ", "1_0", "-1", "0", "1.0",
                "1\n", "1" * 5000, str(MAX_VERSION + 1)]
