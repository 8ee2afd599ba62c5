"""What 7-bit weights (``reduce_range``) cost onnxruntime's dynamic int8 on this CPU, against full 8-bit ones.

    python benchmarks/onnx_int8_range.py runs/default/export-*/onnx/fp32

Quantizes the float ONNX file both ways (as ``toolchain.artifacts.onnx_io.quantize`` does, MLP down projections float)
and prints top-1 agreement and mean KL against the float file over a few fixed texts, side by side. On an
x86 CPU with VNNI both work and 7 bits costs a little; without VNNI onnxruntime's u8×s8 kernel saturates at
int16 and full-range weights lose most of the model: which one this machine is, ``grep vnni /proc/cpuinfo``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The capital of France is Paris, and the capital of Spain is Madrid.",
         "Classify the sentiment of this review: the food was cold and the waiter rude.",
         "Summarize: The city council voted on Tuesday to expand the bike lane network across the downtown area."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="An export's onnx/fp32 folder.")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from toolchain.backends.onnx import OnnxEngine
    from toolchain.quality.lm_adapter import log_softmax

    src = Path(args.folder) / "model.onnx"
    ref = OnnxEngine(src.parent)
    ids = [ref.tokenize(t) for t in TEXTS]

    def logits(engine, x):
        out, _ = engine._run(np.array([x]), np.ones((1, len(x)), dtype=np.int64), engine._empty_past())
        return out[0].astype(np.float64)

    base = [logits(ref, x) for x in ids]
    keep_float = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
                  if n.op_type == "MatMul" and "down_proj" in n.name]
    work = Path(tempfile.mkdtemp(prefix="int8-range-"))
    for reduce_range in (False, True):
        out = work / f"reduce_range_{reduce_range}"
        shutil.copytree(src.parent, out, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data", "*.data"))
        quantize_dynamic(str(src), str(out / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=reduce_range, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_float)
        engine = OnnxEngine(out)
        agree = total = 0
        kl = []
        for x, b in zip(ids, base):
            q = logits(engine, x)
            agree += int((q.argmax(-1) == b.argmax(-1)).sum())
            total += len(x)
            lp, lq = log_softmax(b), log_softmax(q)
            kl.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
        print(f"weights in {7 if reduce_range else 8} bits: top-1 agreement {agree / total:.3f}, "
              f"mean KL {np.mean(kl):.4f} ({total} positions)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
