"""The pass tests import their helper (`irtext`) and each other's example modules by plain name,
under any --import-mode."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
