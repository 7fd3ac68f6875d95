"""Run-folder components: logging and metrics sinks."""
