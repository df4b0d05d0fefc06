"""openai-model-rerouter: rewrite the model an OpenAI-compatible client asks for."""

__version__ = "0.1.0"
