"""The OpenAI-compatible server: one model (a GGUF through llama.cpp, or an ONNX model through onnxruntime or
onnxruntime-genai) behind the OpenAI API, with what every request cost. One concern per module: ``settings``,
``schemas`` (request bodies), ``text`` (streamed text), ``metrics``, ``scheduling`` (the engine's worker and
batching), ``app`` (the routes), ``targets`` (which file is served or benched, and starting a child server).

    POST /v1/chat/completions   POST /v1/completions   (stream: true → server-sent events)
    GET /v1/models   GET /health   GET /metrics (Prometheus text)

One engine, one worker thread: requests queue for it in arrival order, at most ``max_queue`` waiting or
running (more get 429), so concurrent clients never run two generations on one llama.cpp context. Every
response carries OpenAI's ``usage`` and a ``cost`` object measured on this request: queue wait, time to first
token, decode tokens/s, wall time, USD at the recipe's ``cost.usd_per_hour``, and what the same tokens would
have cost at ``cost.reference_api_*`` prices. ``/metrics`` has the same as running totals.
"""
