"""Planning: facts read from GGUF files (and, next, the VRAM estimate and the GPU choice). Pure functions:
nothing here runs a process."""
