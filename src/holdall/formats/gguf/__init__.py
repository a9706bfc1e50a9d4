"""GGUF: the file format llama.cpp, Ollama and LM Studio run. Encoders (``quants``) bit-exact with libggml.

``export.export_gguf`` writes a Hugging Face Llama / Mistral / Qwen2 model as one GGUF file: ``convert`` maps
tensors and architecture metadata, ``vocab`` the tokenizer, ``filetypes`` picks each tensor's type as
llama-quantize does. Nothing here is imported by ``import holdall``.
"""
