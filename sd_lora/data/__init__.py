"""Dataset folders -> training items: dataset.py (scanning, repeats, reg images), captions.py (side
files, caption augmentations), buckets.py (aspect buckets), images.py (decoding), cache.py (latent
and text-embedding caches). Import from the modules; this package imports nothing, so captions.py
stays cheap for the caption tools."""
