"""Training tools for ML-Decoder heads on timm backbones (``mldecoder-fast train ...``; the recipes
are in docs/design.md, Training recipes, and docs/training.md, docs/large_scale.md).

- the loop: ``trainer`` (``Trainer``: loader, autocast, GradScaler, schedule, EMA, progress, logs,
  checkpoints, DDP), ``asl_trainer`` (what the paper's recipes train with);
- the recipes: ``multilabel`` (MS-COCO), ``singlelabel`` (ImageNet A2, any class count), ``zsl``
  (NUS-WIDE zero-shot, with ``query_augment``); their command lines: ``commands/``, registered by
  ``cli``; the demo's settings and head comparison: ``demo``;
- data: ``formats/`` (the file readers), ``datasets``, ``transforms``, ``samplers`` (data order,
  also under DDP), ``synthetic/`` (generated data sets; ``imagenet21k`` is its ``python -m`` entry);
- pieces: ``models``, ``losses``, ``metrics``, ``optim``, ``ema``, ``amp``, ``seeding``,
  ``checkpoint``, ``logs``, ``distributed`` (process groups, DDP/FSDP, collectives).
"""
