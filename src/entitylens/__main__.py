import sys

from entitylens.cli import main

sys.exit(main())
