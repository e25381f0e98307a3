"""The foveated model: DINOv2 encoder with a deep query, the VLM that composes it with an LLM, loading."""
