"""``python -m softrank.pretext`` runs the demo (see :mod:`softrank.pretext.demo`)."""
import sys

from softrank.pretext.demo import main

sys.exit(main())
