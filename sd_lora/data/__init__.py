"""Dataset folders -> training items: scanning, captions, aspect buckets, latent/text caches."""

from .dataset import Dataset, DatasetReport, Item, scan_dataset  # noqa: F401
