"""The export stage: the final student as a stock Hugging Face checkpoint (``ExportConfig``,
``export_checkpoint``)."""
from minitron_fast.export.config import ExportConfig, export_checkpoint

__all__ = ["ExportConfig", "export_checkpoint"]
