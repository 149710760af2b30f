"""`tunesmith prepare CONFIG`: run the data pipeline alone and write what it did.

Writes to `train.output_dir/data/`: one Arrow table per split (`datasets.load_from_disk` reads them),
`data_report.json`, `data_report.md` and `token_lengths.png`. `tunesmith train` runs the same code (and finds
the result in the cache), so what was inspected is what is trained.

The command line builds the tokenizer (`model.run_tokenizer`, light where it can be) and hands it in: the data
layer never imports the model layer, and `prepare` never imports the training stack.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tunesmith.config import Config
from tunesmith.data.build import cache_dir, prepare_from_config, write_data_report

log = logging.getLogger(__name__)


def prepare_command(cfg: Config, tokenizer) -> Path:
    """Prepare the data of `cfg` with the run's `tokenizer` (`model.run_tokenizer.build_tokenizer`: ids equal to
    the one training uses); returns the folder holding the tables and the report."""
    out = Path(cfg.train.output_dir) / "data"
    prepared = prepare_from_config(cfg, tokenizer, load=False)  # the tables are copied, not read
    write_data_report(prepared, out)
    cached = cache_dir(cfg) / prepared.fingerprint
    for name in ("train", "validation", "test"):
        shutil.rmtree(out / name, ignore_errors=True)
        if (cached / name).is_dir():
            shutil.copytree(cached / name, out / name)
    for name, split in prepared.report["splits"].items():
        if split.get("rows"):
            log.info("%s: %d rows -> %d examples, %d loss tokens", name, split["rows"], split["examples"],
                     split["loss_tokens"])
    log.info("prepared data and data_report.md in %s", out)
    return out
