"""The six Riffloop service processes, each a thin shell: ``python -m services.<name>``."""
