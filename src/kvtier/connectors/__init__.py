"""Engine connectors: vLLM (KV connector API) and Hugging Face transformers (Cache + attention functions)."""
