"""Stage one of pcd: ScanNet extraction and teacher caching into WebDataset shards.

Extraction modules import no torch, so that stage one stays light and fast.
"""
