"""RecFlow data path: raw reader, converter to Parquet day shards, synthetic twin, batches."""
