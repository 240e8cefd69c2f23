"""Checkpoint formats, one module per format family.

The format layer: every reader and writer of checkpoint files lives here, below
run discovery (:mod:`auditclip.checkpoints`), clipping (:mod:`auditclip.clip_files`),
the analysis and the CLI, and imports none of them (``tests/test_layers.py``).

The reader layer and what every family shares:

* :mod:`auditclip.formats.readers`: ``open_checkpoint_file`` picks the family for a path
  and wraps its source in the ``TensorReader`` that reads one tensor at a time.
* :mod:`auditclip.formats.source`: ``Source``, what each family gives the reader (raw
  tensors by stored name), the suffix tables and ``normalize_names``.
* :mod:`auditclip.formats.pinned`: ``PinnedFile`` (``pread``, a file changed while read is
  ``changed``) and ``read_strided``: every byte of every family is read through it.
* :mod:`auditclip.formats.index`: the one shard index (``*.index.json``: ``read_shard_index``,
  ``ShardedSource``).
* :mod:`auditclip.formats.dtypes`: the one dtype table (safetensors codes, torch dtypes).
* :mod:`auditclip.formats.detect`: ``detect(path)``, is this a checkpoint and of which
  kind, and every file-name rule (``HF_WEIGHT_NAMES``, ``TRAINER_STATE_FILES``, shard names)
  that run discovery and clipping apply.
* :mod:`auditclip.formats.writers`: streaming safetensors and torch writers (atomic, provenance);
  :mod:`auditclip.formats.torch_zip`: the records and checksums of zip-format torch files,
  for writers that patch a copy in place.

One module per family: where each tensor lives (an index built without reading tensor
data), how to read one tensor at a time, and its ``Source``:

* :mod:`auditclip.formats.safetensors`: ``.safetensors`` files (header validated).
* :mod:`auditclip.formats.torch_pickle`: ``.pt/.pth/.bin/.ckpt`` (meta-device unpickling;
  :mod:`auditclip.formats.safe_pickle`, the unpickler that builds no foreign object).
* :mod:`auditclip.formats.dcp`: ``torch.distributed.checkpoint`` folders
  (``.metadata`` + ``__<rank>_<i>.distcp``), as written by FSDP, torchtitan,
  accelerate's ``SHARDED_STATE_DICT`` and Lightning's sharded checkpoints;
  :mod:`auditclip.formats.dcp_writer` writes one back with tensors changed in every rank's pieces.
* :mod:`auditclip.formats.deepspeed`: DeepSpeed ``engine.save_checkpoint`` runs
  (``latest`` + ``global_step<N>/`` tag folders, ZeRO stages 0 to 3): the module
  weights, or the fp32 master copy reassembled from every rank's optimizer partitions;
  :mod:`auditclip.formats.deepspeed_writer` writes a tag folder back with both copies changed.
* :mod:`auditclip.formats.peft`: PEFT LoRA adapter folders (``adapter_config.json``
  + ``adapter_model.safetensors``).

>>> from auditclip.formats import dcp
>>> dcp.METADATA_FILE
'.metadata'
"""
