"""Drop-in adapters for other people's trainers: the stock HF ``Trainer`` (``hf_trainer``) and TRL's
``DistillationTrainer`` (``trl``, with ``pip install minitron_fast[trl]``). The KD step they share
with distill, search and the benchmarks is ``minitron_fast.ops.kd_step``; the ZeRO-3 gathers are
``minitron_fast.ops.zero3``."""
