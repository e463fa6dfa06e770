"""Flower echo app: FedAvg over one float32 array, clients return it unchanged."""
