"""Integrations with other frameworks, each importing its framework only when imported itself:
`pytorch` (FedDIPSGD, the optimizer), `flower` (FedDIP's strategy and client mod for Flower),
`zarr3` (the zarr v3 codec), `numcodecs` (SparseCodec, the numcodecs codec; registered with
numcodecs when it is installed). The kernel library underneath needs none of them."""
