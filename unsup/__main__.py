import sys

from unsup.cli import console_main

sys.exit(console_main())
