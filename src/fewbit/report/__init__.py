"""Rendering at the edge: rich tables, markdown and plots made from the plain records the library returns."""
