"""Adapters for other trainers (HF ``Trainer``, DeepSpeed ZeRO-3 gathering) and the one KD step (``kd_step``)."""
