"""Converters from raw datasets to fovlm shards, and the synthetic demo dataset.

- :mod:`data_prep.cli`: ``python -m data_prep SOURCE --input ... --output DIR`` and ``python -m data_prep
  synthetic --output DIR``.
- :mod:`data_prep.sources`: one module per dataset, reading its published layout into records.
- :mod:`data_prep.records` / :mod:`data_prep.media`: a record's media converted (through
  :mod:`fovlm.data.frames`) and its JSON validated (by :mod:`fovlm.data.schema`) into tar members.
- :mod:`data_prep.writer`: resumable, parallel shard writing with a manifest.
- :mod:`data_prep.scenes` / :mod:`data_prep.synthetic`: moving-shape clips encoded to mp4, and the demo sets.
"""
