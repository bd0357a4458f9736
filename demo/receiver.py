#!/usr/bin/env python3
"""A stand-in for an on-call paging service: accepts POST /page and answers
with a JSON receipt, so the demo's http step has something real to call."""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Pager(BaseHTTPRequestHandler):
    pages = 0

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length) or b"null")
        Pager.pages += 1
        reply = json.dumps({"paged": True, "page_id": Pager.pages, "received": body}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[1])), Pager).serve_forever()
