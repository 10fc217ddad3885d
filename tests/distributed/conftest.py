"""tests/distributed: fusedopt under FSDP2, DCP, DDP and ZeRO, on CPU with 2 gloo processes.

The processes are started once for the whole directory (``dist_harness.run_scenarios``) and run
every selected scenario in turn; each test then reports its scenario's outcome. The scenario
module must be importable by name in the spawned processes, so this directory goes on sys.path
(the spawn start method hands the parent's sys.path to its children).
"""

import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
