"""Import and export of parameters: consolidated safetensors + params.json (lmjax.interop.consolidated)."""
