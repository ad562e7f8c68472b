"""Supervised training with partial (sparse-pixel) labels on every training image.

Flags and defaults are the reference's; `--help` lists them. The loop lives in engine.py.
"""

import engine

if __name__ == "__main__":
    engine.main("sup_partial")
