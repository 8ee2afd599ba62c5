"""A JSON HTTP server on loopback for tests that stand in for an OpenAI-compatible endpoint or sit in front of one:
``Loopback(answer)`` calls ``answer(path, body, headers)`` for every POST (on the server's threads) and sends back
the (status, JSON bytes, extra headers) it returns."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Loopback:
    def __init__(self, answer):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status, data, headers = answer(self.path, body, self.headers)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def chat_completion(text: str, logprobs=None, completion_tokens: int = 1) -> bytes:
    """An OpenAI chat.completion body answering ``text``."""
    import json

    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop", "logprobs": logprobs}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens,
                                 "total_tokens": 5 + completion_tokens}}).encode()
