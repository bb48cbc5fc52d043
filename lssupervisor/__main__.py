import sys

from lssupervisor.cli import main

sys.exit(main())
