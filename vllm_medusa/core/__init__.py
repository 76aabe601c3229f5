"""Pure-PyTorch Medusa core: heads, checkpoint formats, token trees, acceptance. No vLLM."""
