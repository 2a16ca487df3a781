"""Stand-in foundation models trained on the demo world (components/datasets/world.py)."""
