"""distillery: distill a small student from an open-weight teacher and ship it to the edge."""

__version__ = "0.1.0"
