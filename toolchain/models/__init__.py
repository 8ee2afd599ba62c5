"""Models: references (`pip:`, paths, `hf:`, `openai:`) and loading, licences, chat templates (prompt + answer →
tokens), and the student cut from a teacher (layers, vocabulary)."""
