"""Model folders and the offline builders that make them (``python -m models --help``)."""
