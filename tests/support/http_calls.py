"""Raw HTTP/1.1 calls to a test server's HTTP/REST port (http.client: nothing between the
test and the bytes the server sends), shared by the HTTP test modules."""

from __future__ import annotations

import http.client
import json

from onnxserve.serving.process import ServerProcess


class Answer:
    """One HTTP answer, read whole."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return self.json()["error"]


def call(server: ServerProcess, method: str, path: str, body: bytes | str | dict | None = None,
         headers: dict[str, str] | None = None) -> Answer:
    """``method path`` on the server's HTTP port on a new connection; a dict body is sent
    as JSON."""
    assert server.http_url is not None
    host, port = server.http_url.split(":")
    if isinstance(body, dict):
        body = json.dumps(body)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        return Answer(connection.getresponse())
    finally:
        connection.close()
