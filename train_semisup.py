"""Semi-supervised training with full labels: mean teacher, CutOut/CutMix/ClassMix, optional ReCo.

Flags and defaults are the reference's; `--help` lists them. The loop lives in engine.py.
"""

import engine

if __name__ == "__main__":
    engine.main("semi")
