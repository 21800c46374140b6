"""Old import path of `tritonbn.conversion.unfusion`, kept for code and pickled models that name it: importing
it gives that very module, so every name (private ones that pickles refer to included) is the same object."""

import sys

from .conversion import unfusion

sys.modules[__name__] = unfusion
