"""The REST control API. It reaches processes only through the Manager."""
