"""Supervised training with full labels on --num_labels images (optionally with ReCo).

Flags and defaults are the reference's; `--help` lists them. The loop lives in engine.py.
"""

import engine

if __name__ == "__main__":
    engine.main("sup")
