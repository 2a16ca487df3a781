"""The demo world's trained stand-ins as the registry loads them: their file format (store.py) and
the bundled files (weights/). Training them is the demo world's job (demoworld/standins/), above
this library."""
