"""GGUF: the file format llama.cpp, Ollama and LM Studio run. Encoders (``quants``) bit-exact with libggml."""
