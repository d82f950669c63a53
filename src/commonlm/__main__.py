import sys

from commonlm.cli import main

sys.exit(main())
