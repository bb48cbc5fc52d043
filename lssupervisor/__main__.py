import sys

from lssupervisor.cli.main import main

sys.exit(main())
