"""Semi-supervised training with partial labels: mean teacher, mixing, optional ReCo.

Flags and defaults are the reference's; `--help` lists them. The loop lives in engine.py.
"""

import engine

if __name__ == "__main__":
    engine.main("semi_partial")
