"""Import and export of parameters.

- `consolidated.py`: a run's parameters as one safetensors file + params.json (python -m lmjax.export).
- `hf.py`: Hugging Face Llama folders (config.json + safetensors), both ways.
- `gguf.py`: llama-architecture GGUF files (llama.cpp), dequantized, import only.
- `pretrained.py`: either of those by path, with its tokenizer (`load_pretrained`).
"""
