"""Ecosystem file formats holdall writes and reads: GGUF (llama.cpp) today; GPTQ / AWQ / compressed-tensors later.

One sub-package or file per format. Formats build on the quantization core and the model-family layer only.
"""
