import sys

from unsup.cli import main

sys.exit(main())
