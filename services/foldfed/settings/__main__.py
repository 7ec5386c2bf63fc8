"""`python -m foldfed.settings --markdown | --write README.md | --check README.md`."""

import sys

from foldfed.settings.readme import main

sys.exit(main())
