"""An OpenTelemetry collector for tests: receives OTLP/HTTP protobuf trace exports on loopback
and decodes them (opentelemetry-proto), as a real collector's OTLP receiver would."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class Collector:
    """An OTLP/HTTP trace receiver on loopback: decodes each POST to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.services: set[str] = set()
        self.content_types: set[str] = set()
        self.lock = threading.Lock()

    def by_name(self) -> dict[str, Any]:
        with self.lock:
            return {span.name: span for span in self.spans}


@contextmanager
def running_collector() -> Iterator[tuple[str, Collector]]:
    collector = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            with collector.lock:
                collector.content_types.add(self.headers["Content-Type"])
                for resource_spans in request.resource_spans:
                    for attr in resource_spans.resource.attributes:
                        if attr.key == "service.name":
                            collector.services.add(attr.value.string_value)
                    for scope_spans in resource_spans.scope_spans:
                        collector.spans.extend(scope_spans.spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", collector
    finally:
        server.shutdown()
        server.server_close()


def attributes(span: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for attr in span.attributes:
        value = attr.value
        found[attr.key] = value.string_value or value.int_value
    return found
