import sys

from training.epa_study.study import main

sys.exit(main())
