import sys

from minitron_fast.cli import main

sys.exit(main())
