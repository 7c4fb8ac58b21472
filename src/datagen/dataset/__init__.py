"""From rows to a dataset: dedup, scenario clusters, leak-free splits, the chat format and the dataset card."""
