import sys

from easier.cli import main

sys.exit(main())
