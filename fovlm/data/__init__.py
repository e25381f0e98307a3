"""Data: the shard schema, frames, chat rendering, the streaming pipeline, collation, DataModules."""
