"""`python -m dd` = the `dd` console script (the workflows use this form: a bare `dd` outside the
virtual environment would run the Unix disk-copy tool of the same name)."""
import sys

from dd.cli import main

sys.exit(main())
