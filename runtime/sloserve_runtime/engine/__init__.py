"""The vLLM adapter: our scheduler in vLLM's engine core, its configuration, step log and notices."""
