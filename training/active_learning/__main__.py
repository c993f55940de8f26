"""Entry point: python -m training.active_learning --demo (or --data … --model …); --help lists the options."""
import sys

from training.active_learning.loop import main

if __name__ == "__main__":
    sys.exit(main())
