"""The training input pipeline over the WebDataset shards (layout in docs/architecture.md).

`Loader` gives each rank its batches of an epoch (exact-once over ranks and workers, seeded order, start
mid-epoch, unusable samples replaced and counted); `read_samples` gives the first (or chosen) samples of a
split as one batch; `split_attributes` every sample's attributes from the index alone. Batches hold uint8
images and float16 embeddings; `to_float` turns such a tensor into what models read, after the copy to the
device. `load_manifest` reads and checks `manifest.json`; `verify_shards` checks the shards' sha256 against
it. Errors are `DataError`, with a one-line message naming the file or field.
"""

from .batch import to_float
from .loader import Loader, read_samples, share, split_attributes
from .manifest import DataError, fingerprint, load_manifest, split_count, verify_shards

__all__ = ["DataError", "Loader", "fingerprint", "load_manifest", "read_samples", "share", "split_attributes",
           "split_count", "to_float", "verify_shards"]
