"""Files in, arrays out: curve tables (`curves`), their NTK spectra (`spectra`), a task's
examples (`text`), and the package's file helpers (`_files`). No numerical work here.
"""

from lensllm_jax.data.curves import (
    CurveTable,
    NTKSpectra,
    read_curve_table,
    read_curve_tables,
    write_curve_table,
)
from lensllm_jax.data.spectra import read_spectra, with_spectra, write_spectra

__all__ = [
    "CurveTable",
    "NTKSpectra",
    "read_curve_table",
    "read_curve_tables",
    "read_spectra",
    "with_spectra",
    "write_curve_table",
    "write_spectra",
]
