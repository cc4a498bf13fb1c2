"""Export finished (mask-free) models to other ecosystems: Hugging Face transformers."""

from megatron_msg.export.convert import ExportReport, export_hf
from megatron_msg.export.hf import ExportError, Family, choose_family

__all__ = ["ExportError", "ExportReport", "Family", "choose_family", "export_hf"]
