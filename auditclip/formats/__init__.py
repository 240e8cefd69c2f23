"""Checkpoint formats, one module per format family.

The format layer: every reader and writer of checkpoint files lives here, below
run discovery (:mod:`auditclip.checkpoints`), clipping (:mod:`auditclip.clip_files`),
the analysis and the CLI, and imports none of them (``tests/test_layers.py``).

* :mod:`auditclip.formats.readers`: safetensors headers, lazy torch pickles,
  sharded indexes (``read_shard_index``), ``open_checkpoint_file`` and the
  ``TensorReader`` that reads one tensor at a time from any family below.
* :mod:`auditclip.formats.dtypes`: the one dtype table (safetensors codes, torch dtypes).
* :mod:`auditclip.formats.safe_pickle`: the unpickler that builds no foreign object.
* :mod:`auditclip.formats.writers`: streaming safetensors and torch writers.
* :mod:`auditclip.formats.detect`: ``detect(path)``, is this a checkpoint and of which
  kind, and every file-name rule (``HF_WEIGHT_NAMES``, ``TRAINER_STATE_FILES``, shard names)
  that run discovery and clipping apply.

Each family module knows one family's layout: where each tensor lives (an index built
without reading tensor data) and how to read one tensor at a time. For now:

* :mod:`auditclip.formats.dcp`: ``torch.distributed.checkpoint`` folders
  (``.metadata`` + ``__<rank>_<i>.distcp``), as written by FSDP, torchtitan,
  accelerate's ``SHARDED_STATE_DICT`` and Lightning's sharded checkpoints.
* :mod:`auditclip.formats.deepspeed`: DeepSpeed ``engine.save_checkpoint`` runs
  (``latest`` + ``global_step<N>/`` tag folders, ZeRO stages 0 to 3): the module
  weights, or the fp32 master copy reassembled from every rank's optimizer partitions.
* :mod:`auditclip.formats.peft`: PEFT LoRA adapter folders (``adapter_config.json``
  + ``adapter_model.safetensors``).

>>> from auditclip.formats import dcp
>>> dcp.METADATA_FILE
'.metadata'
"""
