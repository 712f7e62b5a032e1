import sys

from napo.cli import main

sys.exit(main())
