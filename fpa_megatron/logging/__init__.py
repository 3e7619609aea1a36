"""Training metrics: stdout lines, TensorBoard scalars and heatmaps (`MetricsLogger`), FLOPs and MFU (`flops`)."""

from fpa_megatron.logging.flops import achieved_tflops, flops_per_token, mfu
from fpa_megatron.logging.metrics_logger import TAGS, MetricsLogger, memory_gb

__all__ = ["MetricsLogger", "TAGS", "memory_gb", "flops_per_token", "achieved_tflops", "mfu"]
