"""Evaluation data: the readers of the knowledge-retention sets (`retention`), LongBook QA / Event-QA (`longbook`),
LongBench (`longbench`, also the long-context input builder shared with LongBook) and held-out text documents
(`texts`), and one LightningDataModule per evaluation (`datamodules`) whose items a Hugging Face `datasets.Dataset`
holds and shards over ranks. File helpers: `mplus_lightning.data.files`."""
