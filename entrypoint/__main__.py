import sys

from entrypoint.action import main

sys.exit(main())
