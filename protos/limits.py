"""The wire's size limit, declared once for the server, the clients and the benchmarks.

``MAX_MESSAGE_BYTES`` is the server's default ``--max-message-bytes`` (the largest gRPC
message it accepts or sends, and the largest HTTP request body) and the limit the clients
and the load generators set on their gRPC channels, so that whatever the server sends by
default they read.
"""

from __future__ import annotations

#: A batch of 64 float 331x331x3 images (the largest seed input) is 84 MB; gRPC's default
#: of 4 MB does not take even one 224x224x3 float batch of 8.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
