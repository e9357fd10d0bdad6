"""asv: the first call in a fresh interpreter, with a warm on-disk cache and with none.

``timeraw_`` times ``import numbanorm`` plus a first float32 training forward and
backward in a new process (the interpreter's own start-up and NumPy's import are
not counted). ``warm``: the kernels are already in Numba's on-disk cache (setup
makes sure); ``off``: ``NUMBANORM_CACHE=0``, so every kernel compiles.
"""

import subprocess
import sys

from ._cases import FIRST_CALLS, first_call_script, first_call_setup


class TimeFirstCall:
    params = ["warm", "off"]
    param_names = ["disk_cache"]
    number = 1
    rounds = 1
    repeat = (1, 3, 60.0)
    timeout = 600

    def setup(self, disk_cache):
        if disk_cache == "warm":
            subprocess.run([sys.executable, "-c", first_call_script(True)], check=True, capture_output=True)

    def timeraw_first_call(self, disk_cache):
        return "import numbanorm\n" + FIRST_CALLS, first_call_setup(disk_cache == "warm")
