"""``python -m keras_curv``: the same as the ``keras-curv`` command."""

import sys

from keras_curv.cli import main

sys.exit(main())
