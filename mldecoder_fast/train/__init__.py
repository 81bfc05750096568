"""Training tools for ML-Decoder heads on timm backbones (``mldecoder-fast train ...``).

``multilabel`` is the MS-COCO recipe of the paper (see docs/training.md). The pieces are small
modules that other recipes can reuse: ``data`` (COCO json / CSV datasets), ``losses``
(Asymmetric Loss), ``metrics`` (mAP), ``ema``, ``optim``, ``checkpoint``.
"""
