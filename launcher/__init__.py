"""launcher: plans, starts and supervises llama-server and Ollama instances across a machine's GPUs."""

__version__ = "0.1.0"
