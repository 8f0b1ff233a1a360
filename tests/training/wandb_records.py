"""Reading an offline Weights & Biases run back, to check what training logged into it."""

import json
import struct
from pathlib import Path


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """{step: {key: value}} from the history records of the offline W&B runs under run_dir/wandb.
    The .wandb file is W&B's record log: a 7-byte header (":W&B", magic, version), then 32 KiB
    blocks of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)
    and its bytes, the chunks of one record holding a serialised wandb Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    history = {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, record = f.read_bytes(), 7, b""
        assert data[:4] == b":W&B", f
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if left < 7 or (n == 0 and kind == 0):  # the rest of a block is padding
                pos += left
                continue
            record += data[pos + 7 : pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):
                r = wandb_internal_pb2.Record()
                r.ParseFromString(record)
                record = b""
                if r.WhichOneof("record_type") == "history":
                    items = {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
                    }
                    history.setdefault(items.pop("_step"), {}).update(items)
    return history
