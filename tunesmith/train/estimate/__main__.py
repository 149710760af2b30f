"""The `--measure` child: `python -m tunesmith.train.estimate CONFIG RESULT` trains CONFIG and writes RESULT."""

import sys

from tunesmith.train.estimate.measure import measure_child

measure_child(*sys.argv[1:])
