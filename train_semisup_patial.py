"""Alias of train_semisup_partial.py under the misspelt name the reference ReCo README uses."""

import engine

if __name__ == "__main__":
    engine.main("semi_partial")
