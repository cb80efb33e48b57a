"""Evaluation data readers: knowledge-retention sets (`retention`), LongBook QA / Event-QA (`longbook`) and LongBench
(`longbench`, also the long-context input builder shared with LongBook). File helpers: `mplus_lightning.data.files`."""
