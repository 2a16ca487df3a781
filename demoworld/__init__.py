"""The demo world: a toy world of painted regions, the synthetic twins of the benchmarks drawn from
it, and the stand-in foundation models trained on it (``fmbseg demo``, the ``demo`` model profile).

A wing above the library: it imports ``components``, and ``components`` never imports it (the
registry only loads the stand-ins' bundled files, components/models/standins/weights/).

- world.py: the world's concepts, their looks, and seeded scenes;
- synthetic.py: each dataset source's twin in its raw on-disk format (``download.synthetic``);
- standins/: training ``world-clip`` and ``world-sam`` (``fmbseg weights train-demo``).
"""
