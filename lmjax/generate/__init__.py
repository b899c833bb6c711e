"""Generation: KV cache, samplers, jitted prefill/decode, the lane engine with tool calls."""
