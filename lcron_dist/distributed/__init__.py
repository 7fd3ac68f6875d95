"""Process groups, TorchRec sharding of the embedding tables, and the DeepSpeed engine for dense parameters."""
