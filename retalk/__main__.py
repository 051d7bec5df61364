import sys

from retalk.cli import main

sys.exit(main())
