"""``python -m fusedopt.lr_scheduler plot --schedule SPEC [--schedule SPEC ...] --lr 0.1 --steps 1000 --out lr.png``."""

import sys

from fusedopt.lr_scheduler._cli import main

if __name__ == "__main__":
    sys.exit(main())
