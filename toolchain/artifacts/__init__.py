"""Model files: GGUF (converter, quantizer, imatrix, metadata), ONNX, safetensors — each checked before anything
loads it — and what a laptop runtime needs beside them (an Ollama Modelfile)."""
