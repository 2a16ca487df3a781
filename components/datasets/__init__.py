"""Datasets: the source registry, downloads, conversion to the canonical layout, readers.

The benchmarks' synthetic twins are the demo world's (demoworld/synthetic.py), above this library.

Canonical layout (docs/design.md §3): ``images/<split>/<id>.<ext>``, ``labels/<split>/<id>.png`` (uint8,
255 = ignore), ``classes.txt``, ``meta.json``.
"""
