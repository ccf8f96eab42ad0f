"""imgcls: train, inspect and ship image classifiers from the terminal."""

__version__ = "0.1.0"
