"""Data: the frame contract, token roles, the shard schema, frames, chat rendering, shards, the epoch plan, the
batch stream, collation, DataModules."""
