"""deploykit: deploy quantized LLMs with vLLM behind MQTT."""

__version__ = "0.1.0"
