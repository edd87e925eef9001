"""The language models DynTS decodes with: loading (Hugging Face, GGUF, the embedded model), architecture shapes
with random weights, and the importance head that scores tokens from their hidden states."""
