"""``spasem.io.load`` / ``spasem.io.save``: see :mod:`spasem.core.io`."""

from spasem.core.io import SUPPORTED_SUFFIXES, check_writable, from_sitk, load, read_grid, save, to_sitk

__all__ = ["SUPPORTED_SUFFIXES", "check_writable", "from_sitk", "load", "read_grid", "save", "to_sitk"]
