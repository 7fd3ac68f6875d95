"""Serving export: a trained cascade as artifacts a server loads with torch and fbgemm alone.

    EXPORT/manifest.json            stages, quotas, feature order, vocabulary sizes, dtype, source, versions
    EXPORT/item_embeddings.parquet  video id, its item features and the retrieval item tower's vector
    EXPORT/retrieval_user.pt2       torch.export program: user and history ids -> user vector
    EXPORT/prerank.pt2, ranking.pt2 torch.export programs: requests with their candidates -> scores

restore (a checkpoint of any world size and sharding -> one unsharded Cascade), programs (the modules
that are exported), catalogue (the item index), export (lcron-export), runtime (loads an export: torch,
fbgemm and pyarrow only), score (lcron-score: the cascade over a day, metrics, latency).
"""
