"""Training with PyTorch Lightning: the LightningModule, the data module and the QAT callbacks."""
