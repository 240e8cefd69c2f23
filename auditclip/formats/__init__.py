"""Checkpoint formats, one module per format family.

Each module knows one family's layout: where each tensor lives (an index built
without reading tensor data) and how to read one tensor at a time. For now:

* :mod:`auditclip.formats.dcp`: ``torch.distributed.checkpoint`` folders
  (``.metadata`` + ``__<rank>_<i>.distcp``), as written by FSDP, torchtitan,
  accelerate's ``SHARDED_STATE_DICT`` and Lightning's sharded checkpoints.
* :mod:`auditclip.formats.deepspeed`: DeepSpeed ``engine.save_checkpoint`` runs
  (``latest`` + ``global_step<N>/`` tag folders, ZeRO stages 0 to 3): the module
  weights, or the fp32 master copy reassembled from every rank's optimizer partitions.

>>> from auditclip.formats import dcp
>>> dcp.METADATA_FILE
'.metadata'
"""
