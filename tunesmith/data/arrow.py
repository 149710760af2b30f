"""The columns of tokenised examples and the Arrow layout of a prepared split, as `datasets` writes them, without
importing `datasets` (~1 s of CPU): `prepare` writes the tables, training reads them with `datasets`.

tests/test_pipeline.py checks the schema and `dataset_info.json` against what `datasets.Features` and
`datasets.DatasetInfo` produce for the same columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

# column -> its `datasets` type: a list of int32 ids, or a scalar Value of that dtype
TOKEN_COLUMNS = {
    "input_ids": "ids", "labels": "ids", "source": "string", "rejected_ids": "ids", "rejected_labels": "ids",
    "desirable": "bool", "truncated": "bool", "dropped": "bool", "length": "int64", "loss_tokens": "int64",
}
_ARROW = {"ids": pa.list_(pa.int32()), "string": pa.string(), "bool": pa.bool_(), "int64": pa.int64()}


def features_json(columns: list[str]) -> dict:
    """The columns' `datasets.Features`, as `Features.to_dict()` writes them."""
    def feature(kind: str) -> dict:
        if kind == "ids":
            return {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"}
        return {"dtype": kind, "_type": "Value"}

    return {name: feature(TOKEN_COLUMNS[name]) for name in columns}


def schema(columns: list[str]) -> pa.Schema:
    """The Arrow schema `datasets.Features(...).arrow_schema` gives: the types, and the features as metadata."""
    metadata = {"huggingface": json.dumps({"info": {"features": features_json(columns)}})}
    return pa.schema([(name, _ARROW[TOKEN_COLUMNS[name]]) for name in columns], metadata=metadata)


def write_dataset_info(directory: Path, columns: list[str]) -> None:
    """`dataset_info.json` as `datasets.DatasetInfo(features=...).write_to_directory` writes it."""
    info = {"description": "", "citation": "", "homepage": "", "license": "", "features": features_json(columns)}
    (directory / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def read_table(directory: Path) -> pa.Table:
    """The table of a split saved in this layout (or by `datasets.Dataset.save_to_disk`): its Arrow stream files
    in the order state.json lists them, memory-mapped."""
    state = json.loads((Path(directory) / "state.json").read_text(encoding="utf-8"))
    tables = [pa.ipc.open_stream(pa.memory_map(str(Path(directory) / f["filename"]))).read_all()
              for f in state["_data_files"]]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
