"""minillm: the package behind the course's notebooks, exercises and command line."""

__version__ = "0.1.0"
