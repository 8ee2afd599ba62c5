"""Quality: what a right answer is (metrics), intervals and tests (stats), lm-eval's per-prompt hooks and the
retention tables (scores), the quality gate, the held-out harness, the LLM judge, constrained decoding, and
lm-eval's view of any engine."""
