"""``python -m toolchain.serve``: one model file behind the server, with the settings given on the command line.

The entry point bench measures the server through (a child process on 127.0.0.1, no recipe needed); users
start servers with ``distillery serve``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from toolchain.serve import targets
from toolchain.serve.app import serve
from toolchain.serve.settings import Settings


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m toolchain.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--file", required=True, type=Path, help="a .gguf file or an ONNX model folder")
    ap.add_argument("--backend", default=None, 
                    help="llama_cpp, onnxruntime or onnxruntime_genai (default: from the file)")
    ap.add_argument("--model-id", default="local")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--stream-interval-ms", type=float, default=0.0)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args(argv)
    target = targets.from_file(a.file, a.backend)
    settings = Settings(model_id=a.model_id, max_new_tokens=a.max_new_tokens, system_prompt=None,
                        stream_interval_ms=a.stream_interval_ms)
    serve(targets.open_engine(target, n_ctx=a.n_ctx), settings, "127.0.0.1", a.port)


if __name__ == "__main__":
    main()
