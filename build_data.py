"""Data: the dataset table, label maps, joint transforms, datasets, loaders, label-budget splits,
partial labels and the synthetic demo dataset."""

from module_list import IGNORE_INDEX

# Void value of label files on disk; it becomes IGNORE_INDEX in tensors.
VOID = 255


class DataError(Exception):
    """A problem with the user's data or data flags; the message names the file or flag and the fix."""


# ---------------------------------------------------------------------------------------------
# Splits, partial labels and the demo dataset (below this line)
# ---------------------------------------------------------------------------------------------
