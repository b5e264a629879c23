"""Teacher backends: transformers (CPU or GPU) and vLLM (GPU), behind one interface."""
