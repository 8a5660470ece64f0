"""The evaluation protocol of the paper (``spasem evaluate``): datasets, support draws,
parallel/resumable execution, metrics and reports. See ``docs/evaluation.md``."""
