"""Training-side data: Megatron-core GPT datasets and resumable data-parallel micro-batches.

See `fpa_megatron.data.datasets` (not imported here, so importing the package stays cheap).
"""
