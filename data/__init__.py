"""Dataset preparation for nanoMTP (see data/prepare.py for the command line, data/dataset.py for the reader API)."""
