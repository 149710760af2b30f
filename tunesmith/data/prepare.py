"""`tunesmith prepare CONFIG`: run the data pipeline alone and write what it did.

Writes to `train.output_dir/data/`: one Arrow table per split (`datasets.load_from_disk` reads them),
`data_report.json`, `data_report.md` and `token_lengths.png`. `tunesmith train` runs the same code (and finds
the result in the cache), so what was inspected is what is trained.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tunesmith.config import Config
from tunesmith.data.build import cache_dir, prepare_from_config, write_data_report
from tunesmith.track.logs import setup_logging

log = logging.getLogger(__name__)


def prepare_command(cfg: Config) -> Path:
    """Prepare the data of `cfg`; returns the folder holding the tables and the report."""
    from tunesmith.train.run import build_tokenizer

    out = Path(cfg.train.output_dir) / "data"
    setup_logging(None, cfg.tracking.log_level)
    tokenizer, _ = build_tokenizer(cfg)
    prepared = prepare_from_config(cfg, tokenizer)
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
