"""Op implementations, one subpackage per backend.

`reference` is the pure-PyTorch spec; `triton` and `cuda` hold the fused kernels. Nothing here is
imported by `import crossvit_fast` except the reference: backends load lazily through
`crossvit_fast.backends`.
"""
