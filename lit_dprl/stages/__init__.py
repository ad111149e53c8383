"""The three stages of the pipeline, each a LightningModule."""
