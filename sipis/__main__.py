import sys

from sipis.cli import main

sys.exit(main())
