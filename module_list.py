"""Training pieces as pure tensor functions: losses, ReCo, mixing, EMA teacher, poly schedule, mIoU.

Imports neither build_data nor engine.
"""

# Ignore value inside label tensors (the reference's -1); on disk the void value is 255 (build_data.VOID).
IGNORE_INDEX = -1
