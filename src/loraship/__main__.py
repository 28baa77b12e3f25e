import sys

from loraship.cli import main

sys.exit(main())
