import sys

from clipft.cli import main

sys.exit(main())
