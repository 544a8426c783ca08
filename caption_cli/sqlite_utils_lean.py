"""sqlite-utils without the pandas import it does not need here.

sqlite_utils.db imports pandas at import time, when it is installed, only to map
pandas dtypes to column types. caption-cli never stores a pandas value, and where
pandas is installed (ray[data] brings it, with pyarrow) that import is the largest
part of every command's start-up: 0.43 s of 1.0 s before the first photo is read,
measured on a 2-core machine. pandas is hidden for the duration of that one import
only; if anything has imported pandas already, sqlite-utils gets it as usual.
"""

from __future__ import annotations

import sys


def _import_without_pandas():
    if "pandas" in sys.modules or "sqlite_utils.db" in sys.modules:
        import sqlite_utils
        return sqlite_utils
    sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` raises ImportError
    try:
        import sqlite_utils
    finally:
        del sys.modules["pandas"]
    return sqlite_utils


Database = _import_without_pandas().Database

__all__ = ["Database"]
