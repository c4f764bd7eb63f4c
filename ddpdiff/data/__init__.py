"""The training input pipeline over the WebDataset shards (layout in docs/architecture.md).

`Loader` gives each rank its batches of an epoch (exact-once over ranks and workers, seeded order, start
mid-epoch, unusable samples replaced and counted); `read_samples` gives the first samples of a split (or
chosen ones, `split_attrs` saying which have which attributes) as one batch; `load_manifest` reads and
checks `manifest.json`; `verify_shards` checks the shards' sha256 against it. Errors are `DataError`, with a one-line message naming the file or field.
"""

from .loader import Loader, read_samples, share, split_attrs
from .manifest import DataError, load_manifest, split_count, verify_shards

__all__ = ["DataError", "Loader", "load_manifest", "read_samples", "share", "split_attrs", "split_count",
           "verify_shards"]
