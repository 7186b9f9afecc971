"""Writers with the commit protocol: Parquet tables, COCO export."""
