"""Integrations with other frameworks, each importing its framework only when imported itself:
`pytorch` (FedDIPSGD, the optimizer), `flower` (FedDIP's strategy and client mod for Flower),
`zarr3` (the zarr v3 codec). The kernel library underneath needs none of them."""
